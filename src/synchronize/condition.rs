//! `Condition`: wait for a change announced by another process, under a lock.

use super::lock::{Lock, LockGuard};
use super::{deadline_after, region_serde};
use crate::error::{Error, Result};
use crate::sys::futex;
use crate::sys::region::{atomics_struct, magic, Region};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

atomics_struct! {
    struct CondWord {
        /// Bumped by every notify; waiters sleep on it.
        seq: AtomicU32,
        waiters: AtomicU32,
    }
}

/// The futex half of a condition, without its lock.
#[derive(Clone)]
struct Signal {
    region: Arc<Region<CondWord>>,
}

region_serde!(Signal, &[magic::COND]);

/// A condition variable shared between processes (Python's `multiprocessing.Condition`).
///
/// [`acquire`](Condition::acquire) takes the condition's [`Lock`] and returns a
/// [`ConditionGuard`], on which [`wait`](ConditionGuard::wait) releases the lock, sleeps
/// until a [`notify`](Condition::notify), and takes the lock again. Waits may also end
/// spuriously (a notify can wake a few more waiters than asked): re-check the state, or
/// use [`wait_for`](ConditionGuard::wait_for).
///
/// Unlike Python, `notify` may be called without holding the lock. The lock is a plain
/// (non-recursive) [`Lock`]; a holder that dies is handled as for any `Lock`, and a
/// waiter that dies holds nothing, so it never blocks the others.
///
/// ```
/// use multiprocess::{Condition, Process, RawValue};
///
/// fn produce(args: (Condition, RawValue<u32>)) {
///     let (cond, ready) = args;
///     let _g = cond.acquire();
///     ready.set(1);
///     cond.notify_all();
/// }
///
/// let cond = Condition::new()?;
/// let ready = RawValue::new(0u32)?;
/// let p = Process::new(produce, (cond.clone(), ready.clone()));
/// let mut g = cond.acquire();
/// p.start()?;
/// g.wait_for(|| ready.get() == 1);
/// drop(g);
/// p.join()?;
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Clone, Serialize, Deserialize)]
pub struct Condition {
    lock: Lock,
    signal: Signal,
}

impl Condition {
    /// A new condition with a lock of its own.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new() -> Result<Condition> {
        Self::with_lock(Lock::new()?)
    }

    /// A new condition over an existing lock (Python's `Condition(lock)`).
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn with_lock(lock: Lock) -> Result<Condition> {
        Ok(Condition {
            lock,
            signal: Signal {
                region: Arc::new(Region::new(
                    c"multiprocess-condition",
                    magic::COND,
                    0,
                    1,
                    0,
                )?),
            },
        })
    }

    fn word(&self) -> &CondWord {
        self.signal.region.header()
    }

    /// The condition's lock.
    pub fn lock(&self) -> &Lock {
        &self.lock
    }

    /// Takes the lock (blocking).
    pub fn acquire(&self) -> ConditionGuard<'_> {
        ConditionGuard {
            cond: self,
            guard: Some(self.lock.acquire()),
        }
    }

    /// Takes the lock if it is free.
    pub fn try_acquire(&self) -> Option<ConditionGuard<'_>> {
        self.lock.try_acquire().map(|g| ConditionGuard {
            cond: self,
            guard: Some(g),
        })
    }

    /// Waits at most `timeout` for the lock; [`Error::Timeout`] if it stays taken.
    ///
    /// # Errors
    /// [`Error::Timeout`] if the lock stays taken for `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<ConditionGuard<'_>> {
        Ok(ConditionGuard {
            cond: self,
            guard: Some(self.lock.acquire_timeout(timeout)?),
        })
    }

    /// Wakes at least one waiter, if any (up to `n`, plus possibly a few that were just
    /// going to sleep).
    pub fn notify(&self, n: u32) {
        let w = self.word();
        w.seq.fetch_add(1, Ordering::SeqCst);
        if w.waiters.load(Ordering::SeqCst) > 0 {
            futex::wake(&w.seq, n.max(1));
        }
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) {
        let w = self.word();
        w.seq.fetch_add(1, Ordering::SeqCst);
        if w.waiters.load(Ordering::SeqCst) > 0 {
            futex::wake_all(&w.seq);
        }
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condition")
            .field("lock", &self.lock)
            .field("waiters", &self.word().waiters.load(Ordering::Relaxed))
            .finish()
    }
}

/// Holds a [`Condition`]'s lock; waits on the condition. Releases the lock on drop.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ConditionGuard<'a> {
    cond: &'a Condition,
    // None only for the duration of a wait.
    guard: Option<LockGuard<'a>>,
}

impl ConditionGuard<'_> {
    /// Releases the lock, sleeps until notified, and takes the lock again.
    pub fn wait(&mut self) {
        self.wait_until(None);
    }

    /// As [`wait`](Self::wait), for at most `timeout`; false if it timed out (Python's
    /// `wait(timeout)` result). The lock is held again in either case.
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        self.wait_until(deadline_after(timeout))
    }

    /// Waits until `pred()` is true (checked first, then after every wake).
    pub fn wait_for(&mut self, mut pred: impl FnMut() -> bool) {
        while !pred() {
            self.wait();
        }
    }

    /// As [`wait_for`](Self::wait_for), for at most `timeout` in all;
    /// [`Error::Timeout`] if `pred()` is still false then.
    ///
    /// # Errors
    /// [`Error::Timeout`] if `pred()` is still false after `timeout`.
    pub fn wait_for_timeout(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = deadline_after(timeout);
        while !pred() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::timeout());
            }
            self.wait_until(deadline);
        }
        Ok(())
    }

    /// Whether a holder of the lock died before this guard got it (see
    /// [`LockGuard::owner_died`]); also set when that happened while re-taking the lock
    /// after a wait.
    pub fn owner_died(&self) -> bool {
        self.guard.as_ref().is_some_and(LockGuard::owner_died)
    }

    fn wait_until(&mut self, deadline: Option<Instant>) -> bool {
        let w = self.cond.word();
        w.waiters.fetch_add(1, Ordering::SeqCst);
        let seq = w.seq.load(Ordering::SeqCst);
        let died = self.owner_died();
        drop(self.guard.take());
        let woken = futex::wait(&w.seq, seq, deadline) == futex::Wake::Woken;
        w.waiters.fetch_sub(1, Ordering::SeqCst);
        let mut g = self.cond.lock.acquire();
        if died {
            g.set_owner_died();
        }
        self.guard = Some(g);
        woken || w.seq.load(Ordering::SeqCst) != seq
    }
}

impl fmt::Debug for ConditionGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConditionGuard")
            .field("owner_died", &self.owner_died())
            .finish()
    }
}
