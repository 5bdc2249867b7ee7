//! `Lock` and `RLock`: a futex mutex whose word records its holder, so that waiters can
//! detect a dead holder and take over.

use super::{deadline_after, region_serde};
use crate::error::{Error, Result};
use crate::sys::region::{atomics_struct, magic, Region};
use crate::sys::robust::{Locked, RobustLock};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

atomics_struct! {
    /// The shared state of a lock: the crash-safe lock word (which names its holder
    /// thread) and the recursion depth of an `RLock`.
    pub(crate) struct LockWord {
        lock: RobustLock,
        count: AtomicU32,
        _pad: AtomicU32,
    }
}

impl LockWord {
    /// Acquires (blocking until `deadline`); `None` on timeout, else whether the previous
    /// holder died holding it.
    #[inline]
    pub(crate) fn lock(&self, deadline: Option<std::time::Instant>) -> Option<bool> {
        self.lock
            .lock(deadline)
            .map(|l| matches!(l, Locked::OwnerDied))
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.lock.try_lock_free()
    }

    #[inline]
    pub(crate) fn unlock(&self) {
        self.lock.unlock();
    }

    fn holder(&self) -> u32 {
        self.lock.holder().map_or(0, |h| h.tid())
    }

    /// Whether the calling thread is the recorded holder (thread id and start time, in
    /// one word, so a reused thread id is not mistaken for a dead holder).
    fn held_by_me(&self) -> bool {
        self.lock.held_by_me()
    }
}

fn new_region(magic: u32) -> Result<Arc<Region<LockWord>>> {
    Ok(Arc::new(Region::new(c"multiprocess-lock", magic, 0, 1, 0)?))
}

/// A lock shared between processes (Python's `multiprocessing.Lock`).
///
/// [`acquire`](Lock::acquire) returns a guard that releases on drop. Clones are handles
/// to the same lock; put one in a [`Process`](crate::Process)'s args to share it.
///
/// The lock belongs to no particular thread: a guard may be leaked with
/// [`std::mem::forget`] and the lock released later, from any thread or process, with
/// [`Lock::release`], as Python allows. The holder on record is still the thread that
/// acquired it, though: if that thread ends before someone releases the lock, waiters
/// treat the lock as abandoned and take it over (with `owner_died`).
///
/// If a process dies holding it, the next acquirer gets it after a short check and its
/// guard reports [`owner_died`](LockGuard::owner_died) (see the
/// [module docs](crate::synchronize#when-a-process-dies)).
///
/// ```
/// use multiprocess::Lock;
///
/// let lock = Lock::new()?;
/// {
///     let _g = lock.acquire();
///     assert!(lock.try_acquire().is_none());
/// }
/// assert!(lock.try_acquire().is_some());
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Clone)]
pub struct Lock {
    pub(crate) region: Arc<Region<LockWord>>,
}

// A Value's or Array's lock travels as its whole region.
region_serde!(Lock, &[magic::LOCK, magic::VALUE, magic::ARRAY]);

impl Lock {
    /// A new, unlocked lock.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new() -> Result<Lock> {
        Ok(Lock {
            region: new_region(magic::LOCK)?,
        })
    }

    /// A lock handle over an existing region (a `Value`'s own lock).
    pub(crate) fn from_region(region: Arc<Region<LockWord>>) -> Lock {
        Lock { region }
    }

    #[inline]
    fn word(&self) -> &LockWord {
        self.region.header()
    }

    /// Blocks until the lock is ours.
    #[inline]
    pub fn acquire(&self) -> LockGuard<'_> {
        let died = self.word().lock(None).unwrap_or(false);
        self.guard(died)
    }

    /// Takes the lock if it is free, without waiting (Python's `acquire(block=False)`).
    /// This fast check does not look for a dead holder; a blocking or timed acquire does.
    #[inline]
    pub fn try_acquire(&self) -> Option<LockGuard<'_>> {
        self.word().try_lock().then(|| self.guard(false))
    }

    /// Waits at most `timeout` for the lock; [`Error::Timeout`] if it stays taken. Before
    /// giving up it checks once whether the holder died (and then takes the lock over).
    ///
    /// # Errors
    /// [`Error::Timeout`] if a live holder keeps the lock for `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard<'_>> {
        match self.word().lock(deadline_after(timeout)) {
            Some(died) => Ok(self.guard(died)),
            None => Err(Error::timeout()),
        }
    }

    /// Releases a lock whose guard was leaked (`std::mem::forget`), from any thread or
    /// process. [`Error::ReleasedTooOften`] if the lock is not held.
    ///
    /// # Errors
    /// [`Error::ReleasedTooOften`] if the lock is not held.
    pub fn release(&self) -> Result<()> {
        if self.word().holder() == 0 {
            return Err(Error::ReleasedTooOften);
        }
        self.word().unlock();
        Ok(())
    }

    /// Whether some thread holds the lock right now (a snapshot).
    pub fn is_locked(&self) -> bool {
        self.word().holder() != 0
    }

    fn guard(&self, owner_died: bool) -> LockGuard<'_> {
        LockGuard {
            lock: self,
            owner_died,
            _not_send: PhantomData,
        }
    }
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("holder", &self.word().holder())
            .finish()
    }
}

/// Holds a [`Lock`]; releases it when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard<'a> {
    lock: &'a Lock,
    owner_died: bool,
    _not_send: PhantomData<*const ()>,
}

impl LockGuard<'_> {
    /// Whether the previous holder died holding the lock (a process killed, a thread
    /// ended) and this acquire took it over, like `EOWNERDEAD`. What the lock protects may
    /// be in a half-updated state.
    pub fn owner_died(&self) -> bool {
        self.owner_died
    }

    /// The lock this guard holds.
    pub fn lock(&self) -> &Lock {
        self.lock
    }

    pub(crate) fn set_owner_died(&mut self) {
        self.owner_died = true;
    }
}

impl Drop for LockGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.lock.word().unlock();
    }
}

impl fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("owner_died", &self.owner_died)
            .finish()
    }
}

/// A recursive lock shared between processes (Python's `multiprocessing.RLock`): the
/// thread that holds it may acquire it again, and it is free once every acquire has been
/// released.
///
/// Unlike [`Lock`], an `RLock` belongs to the thread that acquired it: only that thread
/// may [`release`](RLock::release) a leaked guard (others get [`Error::NotOwner`]). A
/// dead holder is detected as for [`Lock`]; the taking-over guard says
/// [`owner_died`](RLockGuard::owner_died) and the recursion count starts afresh at one.
///
/// ```
/// use multiprocess::RLock;
///
/// let lock = RLock::new()?;
/// let a = lock.acquire();
/// let b = lock.acquire(); // the same thread: no deadlock
/// assert_eq!(lock.count(), 2);
/// drop(b);
/// drop(a);
/// assert_eq!(lock.count(), 0);
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Clone)]
pub struct RLock {
    region: Arc<Region<LockWord>>,
}

region_serde!(RLock, &[magic::RLOCK]);

impl RLock {
    /// A new, unlocked recursive lock.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new() -> Result<RLock> {
        Ok(RLock {
            region: new_region(magic::RLOCK)?,
        })
    }

    fn word(&self) -> &LockWord {
        self.region.header()
    }

    /// `Some(guard)` if this thread holds it already (recursion).
    fn reenter(&self) -> Option<RLockGuard<'_>> {
        let w = self.word();
        if w.held_by_me() {
            w.count.fetch_add(1, Ordering::Relaxed);
            return Some(self.guard(false));
        }
        None
    }

    fn entered(&self, owner_died: bool) -> RLockGuard<'_> {
        self.word().count.store(1, Ordering::Relaxed);
        self.guard(owner_died)
    }

    /// Blocks until the lock is ours (at once if this thread holds it already).
    pub fn acquire(&self) -> RLockGuard<'_> {
        if let Some(g) = self.reenter() {
            return g;
        }
        let died = self.word().lock(None).unwrap_or(false);
        self.entered(died)
    }

    /// Takes the lock if it is free or already ours, without waiting.
    pub fn try_acquire(&self) -> Option<RLockGuard<'_>> {
        if let Some(g) = self.reenter() {
            return Some(g);
        }
        self.word().try_lock().then(|| self.entered(false))
    }

    /// Waits at most `timeout`; [`Error::Timeout`] if another thread keeps it.
    ///
    /// # Errors
    /// [`Error::Timeout`] if a live holder keeps the lock for `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<RLockGuard<'_>> {
        if let Some(g) = self.reenter() {
            return Ok(g);
        }
        match self.word().lock(deadline_after(timeout)) {
            Some(died) => Ok(self.entered(died)),
            None => Err(Error::timeout()),
        }
    }

    /// Releases one level of a leaked guard. [`Error::NotOwner`] unless the calling
    /// thread holds the lock.
    ///
    /// # Errors
    /// [`Error::NotOwner`] unless the calling thread holds the lock.
    pub fn release(&self) -> Result<()> {
        if !self.word().held_by_me() {
            return Err(Error::NotOwner);
        }
        self.release_one();
        Ok(())
    }

    fn release_one(&self) {
        let w = self.word();
        if w.count.fetch_sub(1, Ordering::Relaxed) <= 1 {
            w.count.store(0, Ordering::Relaxed);
            w.unlock();
        }
    }

    /// How many times the holder has acquired it (0 when free). A snapshot.
    pub fn count(&self) -> u32 {
        if self.word().holder() == 0 {
            0
        } else {
            self.word().count.load(Ordering::Relaxed)
        }
    }

    /// Whether the calling thread holds the lock.
    pub fn is_owned(&self) -> bool {
        self.word().held_by_me()
    }

    fn guard(&self, owner_died: bool) -> RLockGuard<'_> {
        RLockGuard {
            lock: self,
            owner_died,
            _not_send: PhantomData,
        }
    }
}

impl fmt::Debug for RLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RLock")
            .field("holder", &self.word().holder())
            .field("count", &self.count())
            .finish()
    }
}

/// Holds one level of an [`RLock`]; releases that level when dropped. Not `Send`: the
/// lock belongs to the thread that acquired it.
#[must_use = "the level is released as soon as the guard is dropped"]
pub struct RLockGuard<'a> {
    lock: &'a RLock,
    owner_died: bool,
    _not_send: PhantomData<*const ()>,
}

impl RLockGuard<'_> {
    /// Whether this acquire took the lock over from a holder that died (see
    /// [`LockGuard::owner_died`]).
    pub fn owner_died(&self) -> bool {
        self.owner_died
    }
}

impl Drop for RLockGuard<'_> {
    fn drop(&mut self) {
        self.lock.release_one();
    }
}

impl fmt::Debug for RLockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RLockGuard")
            .field("owner_died", &self.owner_died)
            .finish()
    }
}
