//! Robust process-shared locks: a futex word in shared memory that records which process
//! holds it, so that a process killed while holding it (even by `SIGKILL`) does not wedge
//! the others.
//!
//! The word holds the owner's pid (and a "waiters" bit); a second word holds the owner's
//! *identity*: its pid and its start time (from `/proc/<pid>/stat`), which tells a live
//! owner from an unrelated process that got the same pid later. A waiter sleeps on the
//! futex in slices; after each slice it checks that the owner still lives (its `/proc`
//! entry exists, is not a zombie, and has the recorded start time) and, if not, takes the
//! lock over and is told so ([`Locked::OwnerDied`]) so that it can repair what the dead
//! owner left half-done.
//!
//! (glibc's robust `pthread_mutex_t` is not used: it relies on glibc's per-thread state,
//! which the forkserver's raw `clone` children do not refresh.)

use super::futex::{self, Wake};
use std::io;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

/// How a lock call obtained the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locked {
    /// The previous owner released it normally.
    Clean,
    /// The previous owner died holding it; the state it protects may be half-updated.
    OwnerDied,
}

const WAITERS: u32 = 1 << 31;
const PID_MASK: u32 = WAITERS - 1;
const START_BITS: u32 = 40;
const START_MASK: u64 = (1 << START_BITS) - 1;
/// How often a waiter checks that the owner still lives: first after 20 ms, then less
/// often (up to every 160 ms) while a live owner keeps the lock.
const CHECK_FIRST: Duration = Duration::from_millis(20);
const CHECK_MAX: Duration = Duration::from_millis(160);

/// A robust, process-shared lock, to be placed in shared memory (all zero = unlocked).
/// It has no guard: the caller pairs every successful lock with [`RobustMutex::unlock`].
#[repr(C)]
pub(crate) struct RobustMutex {
    word: AtomicU32,
    _pad: u32,
    /// `pid << 40 | start time` of the owner (written just after taking the lock).
    owner: AtomicU64,
}

impl RobustMutex {
    /// Prepares the lock in fresh shared memory (all zero is already a free lock).
    pub(crate) fn init(&self) -> io::Result<()> {
        self.word.store(0, Relaxed);
        self.owner.store(0, Relaxed);
        Ok(())
    }

    fn acquired(&self, identity: u64, died: bool) -> Option<Locked> {
        self.owner.store(identity, Relaxed);
        Some(if died {
            Locked::OwnerDied
        } else {
            Locked::Clean
        })
    }

    /// Locks, waiting until `deadline` (forever if `None`). `Ok(None)` means the deadline
    /// passed first.
    pub(crate) fn lock(&self, deadline: Option<Instant>) -> io::Result<Option<Locked>> {
        let me = identity();
        let pid = (me >> START_BITS) as u32;
        if self.word.compare_exchange(0, pid, Acquire, Relaxed).is_ok() {
            return Ok(self.acquired(me, false));
        }
        let mut check = CHECK_FIRST;
        loop {
            let cur = self.word.load(Relaxed);
            if cur == 0 {
                // Someone may still be waiting behind us: keep the waiters bit.
                if self
                    .word
                    .compare_exchange(0, pid | WAITERS, Acquire, Relaxed)
                    .is_ok()
                {
                    return Ok(self.acquired(me, false));
                }
                continue;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                // Out of time: the lock is ours only if its owner is dead.
                return Ok(self.take_from_dead(cur, pid | (cur & WAITERS), me));
            }
            if cur & WAITERS == 0
                && self
                    .word
                    .compare_exchange(cur, cur | WAITERS, Relaxed, Relaxed)
                    .is_err()
            {
                continue;
            }
            let slice = now + check;
            let until = deadline.map_or(slice, |d| d.min(slice));
            if futex::wait(&self.word, cur | WAITERS, Some(until)) == Wake::TimedOut {
                if let Some(l) = self.take_from_dead(cur | WAITERS, pid | WAITERS, me) {
                    return Ok(Some(l));
                }
                check = (check * 2).min(CHECK_MAX);
            }
        }
    }

    /// If the owner recorded in `seen` is dead, takes the lock over (word `mine`).
    fn take_from_dead(&self, seen: u32, mine: u32, me: u64) -> Option<Locked> {
        let owner = seen & PID_MASK;
        if owner == 0 || owner_alive(owner, self.owner.load(Relaxed)) {
            return None;
        }
        self.word
            .compare_exchange(seen, mine, Acquire, Relaxed)
            .ok()
            .and_then(|_| self.acquired(me, true))
    }

    /// Locks if the lock is free or its owner is dead; `Ok(None)` if a live owner holds it.
    pub(crate) fn try_lock(&self) -> io::Result<Option<Locked>> {
        let me = identity();
        let pid = (me >> START_BITS) as u32;
        match self.word.compare_exchange(0, pid, Acquire, Relaxed) {
            Ok(_) => Ok(self.acquired(me, false)),
            Err(cur) => {
                let mine = pid | (cur & WAITERS);
                Ok(self.take_from_dead(cur, mine, me))
            }
        }
    }

    /// Unlocks a lock this process holds.
    pub(crate) fn unlock(&self) {
        if self.word.swap(0, Release) & WAITERS != 0 {
            futex::wake(&self.word, 1);
        }
    }
}

/// Whether the process `pid` still lives and is the one `recorded` describes (when the
/// record is about that pid).
fn owner_alive(pid: u32, recorded: u64) -> bool {
    let Some((state, start)) = stat(pid) else {
        return false;
    };
    if matches!(state, b'Z' | b'X' | b'x') {
        return false;
    }
    if (recorded >> START_BITS) as u32 == pid && recorded & START_MASK != start & START_MASK {
        return false; // the pid now belongs to another process
    }
    true
}

/// `(state, start time)` from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(u8, u64)> {
    let (state, start) = super::ident::proc_stat(pid)?;
    Some((u8::try_from(state).ok()?, start))
}

/// This process's identity, `pid << 40 | start time`, cached in a page that the kernel
/// wipes in a forked child (`MADV_WIPEONFORK`), so a child never uses its parent's — even
/// one made by a raw `clone`, which runs no fork handlers.
fn identity() -> u64 {
    let cache = identity_cache();
    if let Some(c) = cache {
        let v = c.load(Relaxed);
        if v != 0 {
            return v;
        }
    }
    let pid = super::process::getpid();
    let start = stat(pid).map_or(0, |(_, s)| s);
    let v = (pid as u64) << START_BITS | (start & START_MASK);
    if let Some(c) = cache {
        c.store(v, Relaxed);
    }
    v
}

static CACHE: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
/// Set when the cache page could not be made (then the identity is computed each time).
static NO_CACHE: AtomicU32 = AtomicU32::new(0);

fn identity_cache() -> Option<&'static AtomicU64> {
    let p = CACHE.load(Acquire);
    if !p.is_null() {
        // SAFETY: a published page is never unmapped; it stays mapped (wiped to zero,
        // which is a valid AtomicU64) in forked children.
        return Some(unsafe { &*p });
    }
    if NO_CACHE.load(Relaxed) != 0 {
        return None;
    }
    // SAFETY: a fresh private anonymous page; checked against MAP_FAILED. madvise only
    // changes what a future fork does with it.
    let page = unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if page == libc::MAP_FAILED {
            NO_CACHE.store(1, Relaxed);
            return None;
        }
        if libc::madvise(page, 4096, libc::MADV_WIPEONFORK) != 0 {
            libc::munmap(page, 4096);
            NO_CACHE.store(1, Relaxed);
            return None;
        }
        page.cast::<AtomicU64>()
    };
    match CACHE.compare_exchange(std::ptr::null_mut(), page, AcqRel, Acquire) {
        // SAFETY: we just published the page; it is never unmapped.
        Ok(_) => Some(unsafe { &*page }),
        Err(winner) => {
            // SAFETY: our page was never published; the winner's is never unmapped.
            unsafe {
                libc::munmap(page.cast(), 4096);
                Some(&*winner)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_our_pid_and_start() {
        let me = identity();
        assert_eq!((me >> START_BITS) as u32, std::process::id());
        assert!(owner_alive(std::process::id(), me));
        // A record of our pid with another start time describes a dead process.
        assert!(!owner_alive(std::process::id(), me ^ 1));
    }

    #[test]
    fn lock_try_lock_unlock_and_dead_owner() {
        let m = RobustMutex {
            word: AtomicU32::new(0),
            _pad: 0,
            owner: AtomicU64::new(0),
        };
        assert_eq!(m.lock(None).unwrap(), Some(Locked::Clean));
        assert_eq!(m.try_lock().unwrap(), None);
        let t = Instant::now();
        assert_eq!(
            m.lock(Some(Instant::now() + Duration::from_millis(30)))
                .unwrap(),
            None
        );
        assert!(t.elapsed() >= Duration::from_millis(30));
        m.unlock();
        assert_eq!(m.try_lock().unwrap(), Some(Locked::Clean));
        m.unlock();
        // A lock "held" by a process that no longer exists (pid_max is below 2^22 + 1).
        m.word.store(4_194_304 | WAITERS, Relaxed);
        assert_eq!(m.lock(None).unwrap(), Some(Locked::OwnerDied));
        m.unlock();
        // Also when out of time already, and through try_lock.
        m.word.store(4_194_304, Relaxed);
        assert_eq!(
            m.lock(Some(Instant::now())).unwrap(),
            Some(Locked::OwnerDied)
        );
        m.unlock();
        m.word.store(4_194_304, Relaxed);
        assert_eq!(m.try_lock().unwrap(), Some(Locked::OwnerDied));
        m.unlock();
    }
}
