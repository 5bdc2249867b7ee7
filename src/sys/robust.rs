//! Robust process-shared mutexes: a `pthread_mutex_t` placed in shared memory with the
//! `PTHREAD_PROCESS_SHARED` and `PTHREAD_MUTEX_ROBUST` attributes.
//!
//! When the thread that holds one dies (a `SIGKILL`ed process, say), the kernel walks that
//! thread's robust list at exit, marks the lock "owner died" and wakes one waiter, whose
//! lock call then succeeds with [`Locked::OwnerDied`]: it owns the lock and must repair
//! whatever the dead owner left half-done. The kernel does this by thread id at the moment
//! of death, so pid reuse cannot fool it and nobody has to poll for the owner's liveness.

use std::cell::UnsafeCell;
use std::io;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How a lock call obtained the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locked {
    /// The previous owner released it normally.
    Clean,
    /// The previous owner died holding it; the state it protects may be half-updated. The
    /// lock has already been marked consistent again.
    OwnerDied,
}

/// A robust, process-shared mutex, to be placed in shared memory (a `#[repr(C)]` header).
/// It has no guard: the caller pairs every successful lock with [`RobustMutex::unlock`]
/// on the same thread.
#[repr(C)]
pub(crate) struct RobustMutex(UnsafeCell<libc::pthread_mutex_t>);

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

impl RobustMutex {
    /// Initialises the mutex in place. Call once, in the process that creates the shared
    /// memory, before any other process can see it.
    pub(crate) fn init(&self) -> io::Result<()> {
        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: the attribute object is initialised by pthread_mutexattr_init before use
        // and destroyed after; the mutex lives in memory that no other thread or process
        // uses yet (the caller's promise), so initialising it in place is sound.
        unsafe {
            check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let res = check(libc::pthread_mutexattr_setpshared(
                attr.as_mut_ptr(),
                libc::PTHREAD_PROCESS_SHARED,
            ))
            .and_then(|()| {
                check(libc::pthread_mutexattr_setrobust(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_MUTEX_ROBUST,
                ))
            })
            .and_then(|()| check(libc::pthread_mutex_init(self.0.get(), attr.as_ptr())));
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            res
        }
    }

    fn outcome(&self, r: libc::c_int) -> io::Result<Option<Locked>> {
        match r {
            0 => Ok(Some(Locked::Clean)),
            libc::EOWNERDEAD => {
                // SAFETY: we own the mutex now (EOWNERDEAD means the lock succeeded).
                check(unsafe { libc::pthread_mutex_consistent(self.0.get()) })?;
                Ok(Some(Locked::OwnerDied))
            }
            libc::EBUSY | libc::ETIMEDOUT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Locks, waiting until `deadline` (forever if `None`). `Ok(None)` means the deadline
    /// passed first.
    pub(crate) fn lock(&self, deadline: Option<Instant>) -> io::Result<Option<Locked>> {
        let r = match deadline {
            // SAFETY: the mutex was initialised by `init` (the shared header is only
            // handed out after that) and stays mapped while &self lives.
            None => unsafe { libc::pthread_mutex_lock(self.0.get()) },
            Some(d) => {
                // A cheap first try: most locks are free.
                if let Some(l) = self.try_lock()? {
                    return Ok(Some(l));
                }
                let ts = realtime_deadline(d);
                // SAFETY: as above; `ts` is a live timespec.
                unsafe { libc::pthread_mutex_timedlock(self.0.get(), &ts) }
            }
        };
        self.outcome(r)
    }

    /// Locks if the mutex is free (or its owner is dead); `Ok(None)` if it is held.
    pub(crate) fn try_lock(&self) -> io::Result<Option<Locked>> {
        // SAFETY: as in `lock`.
        let r = unsafe { libc::pthread_mutex_trylock(self.0.get()) };
        self.outcome(r)
    }

    /// Unlocks a mutex this thread holds.
    pub(crate) fn unlock(&self) {
        // SAFETY: the caller holds the lock on this thread (the pairing rule above).
        unsafe {
            libc::pthread_mutex_unlock(self.0.get());
        }
    }
}

/// `pthread_mutex_timedlock` takes an absolute `CLOCK_REALTIME` time.
fn realtime_deadline(d: Instant) -> libc::timespec {
    let left = d.saturating_duration_since(Instant::now());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let at = now.saturating_add(left);
    libc::timespec {
        tv_sec: at.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: at.subsec_nanos() as libc::c_long,
    }
}
