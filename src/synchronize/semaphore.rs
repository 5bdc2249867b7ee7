//! `Semaphore` and `BoundedSemaphore`: a shared counter of permits.

use super::{deadline_after, region_serde};
use crate::error::{Error, Result};
use crate::sys::futex::{self, Wake};
use crate::sys::region::{atomics_struct, magic, Region};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

atomics_struct! {
    struct SemWord {
        value: AtomicU32,
        waiters: AtomicU32,
        /// The bound for a BoundedSemaphore, u32::MAX for a plain one.
        max: AtomicU32,
        _pad: AtomicU32,
    }
}

fn new_region(magic: u32, value: u32, max: u32) -> Result<Arc<Region<SemWord>>> {
    let r = Region::<SemWord>::new(c"multiprocess-semaphore", magic, 0, 1, 0)?;
    r.header().value.store(value, Ordering::Relaxed);
    r.header().max.store(max, Ordering::Release);
    Ok(Arc::new(r))
}

impl SemWord {
    fn acquire(&self) -> SemaphoreGuard<'_> {
        self.take(None);
        SemaphoreGuard { word: self }
    }

    fn try_acquire(&self) -> Option<SemaphoreGuard<'_>> {
        self.try_take().then(|| SemaphoreGuard { word: self })
    }

    fn acquire_timeout(&self, timeout: Duration) -> Result<SemaphoreGuard<'_>> {
        if self.take(deadline_after(timeout)) {
            Ok(SemaphoreGuard { word: self })
        } else {
            Err(Error::timeout())
        }
    }

    #[inline]
    fn try_take(&self) -> bool {
        let mut v = self.value.load(Ordering::Relaxed);
        while v > 0 {
            match self
                .value
                .compare_exchange_weak(v, v - 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => v = now,
            }
        }
        false
    }

    fn take(&self, deadline: Option<Instant>) -> bool {
        if self.try_take() {
            return true;
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let got = loop {
            if self.try_take() {
                break true;
            }
            if futex::wait(&self.value, 0, deadline) == Wake::TimedOut {
                break self.try_take();
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        // A wake meant for us may have arrived as we timed out: pass it on.
        if !got && self.value.load(Ordering::SeqCst) > 0 && self.waiters.load(Ordering::SeqCst) > 0
        {
            futex::wake(&self.value, 1);
        }
        got
    }

    /// Adds a permit; false if that would pass the bound.
    fn give(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        let mut v = self.value.load(Ordering::Relaxed);
        loop {
            if v >= max {
                return false;
            }
            match self
                .value
                .compare_exchange_weak(v, v + 1, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => v = now,
            }
        }
        if self.waiters.load(Ordering::SeqCst) > 0 {
            futex::wake(&self.value, 1);
        }
        true
    }
}

/// A counting semaphore shared between processes (Python's `multiprocessing.Semaphore`).
///
/// [`acquire`](Semaphore::acquire) takes a permit and returns a guard that gives it back
/// when dropped; [`release`](Semaphore::release) adds a permit from anywhere (any thread
/// or process, with or without a guard), as in Python. A permit held by a process that
/// dies is not given back (a semaphore has no owner).
///
/// ```
/// use multiprocess::Semaphore;
///
/// let sem = Semaphore::new(2)?;
/// let a = sem.acquire();
/// let b = sem.acquire();
/// assert!(sem.try_acquire().is_none());
/// drop(a);
/// assert_eq!(sem.get_value(), 1);
/// # drop(b);
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Clone)]
pub struct Semaphore {
    region: Arc<Region<SemWord>>,
}

region_serde!(Semaphore, &[magic::SEM]);

impl Semaphore {
    /// A semaphore with `value` permits.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new(value: u32) -> Result<Semaphore> {
        Ok(Semaphore {
            region: new_region(magic::SEM, value, u32::MAX)?,
        })
    }

    fn word(&self) -> &SemWord {
        self.region.header()
    }

    /// Blocks until a permit is free and takes it.
    pub fn acquire(&self) -> SemaphoreGuard<'_> {
        self.word().acquire()
    }

    /// Takes a permit if one is free, without waiting.
    pub fn try_acquire(&self) -> Option<SemaphoreGuard<'_>> {
        self.word().try_acquire()
    }

    /// Waits at most `timeout` for a permit; [`Error::Timeout`] if none came free.
    ///
    /// # Errors
    /// [`Error::Timeout`] if no permit comes free within `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<SemaphoreGuard<'_>> {
        self.word().acquire_timeout(timeout)
    }

    /// Adds a permit (wakes one waiter).
    pub fn release(&self) {
        self.word().give();
    }

    /// The number of free permits (a snapshot; Python's `get_value`).
    pub fn get_value(&self) -> u32 {
        self.word().value.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("value", &self.get_value())
            .finish()
    }
}

/// A permit of a [`Semaphore`] or [`BoundedSemaphore`], given back on drop.
#[must_use = "the permit is given back as soon as the guard is dropped"]
pub struct SemaphoreGuard<'a> {
    word: &'a SemWord,
}

impl SemaphoreGuard<'_> {
    /// Keeps the permit taken (it is given back only by an explicit `release`).
    pub fn forget(self) {
        std::mem::forget(self);
    }
}

impl Drop for SemaphoreGuard<'_> {
    fn drop(&mut self) {
        // A bounded semaphore released past its bound by someone else meanwhile stays at
        // its bound: the extra release was the error, reported where it happened.
        self.word.give();
    }
}

impl fmt::Debug for SemaphoreGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SemaphoreGuard")
    }
}

/// A semaphore that may not be released above its initial value (Python's
/// `multiprocessing.BoundedSemaphore`): such a [`release`](BoundedSemaphore::release) is
/// [`Error::ReleasedTooOften`].
///
/// ```
/// use multiprocess::{BoundedSemaphore, Error};
///
/// let sem = BoundedSemaphore::new(1)?;
/// sem.acquire().forget();
/// sem.release()?;
/// assert!(matches!(sem.release(), Err(Error::ReleasedTooOften)));
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Clone)]
pub struct BoundedSemaphore {
    region: Arc<Region<SemWord>>,
}

region_serde!(BoundedSemaphore, &[magic::BSEM]);

impl BoundedSemaphore {
    /// A semaphore with `value` permits, never more.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new(value: u32) -> Result<BoundedSemaphore> {
        Ok(BoundedSemaphore {
            region: new_region(magic::BSEM, value, value)?,
        })
    }

    fn word(&self) -> &SemWord {
        self.region.header()
    }

    /// Blocks until a permit is free and takes it.
    pub fn acquire(&self) -> SemaphoreGuard<'_> {
        self.word().acquire()
    }

    /// Takes a permit if one is free, without waiting.
    pub fn try_acquire(&self) -> Option<SemaphoreGuard<'_>> {
        self.word().try_acquire()
    }

    /// Waits at most `timeout` for a permit; [`Error::Timeout`] if none came free.
    ///
    /// # Errors
    /// [`Error::Timeout`] if no permit comes free within `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<SemaphoreGuard<'_>> {
        self.word().acquire_timeout(timeout)
    }

    /// Gives a permit back; [`Error::ReleasedTooOften`] if all are free already.
    ///
    /// # Errors
    /// [`Error::ReleasedTooOften`] if every permit is free already.
    pub fn release(&self) -> Result<()> {
        if self.word().give() {
            Ok(())
        } else {
            Err(Error::ReleasedTooOften)
        }
    }

    /// The number of free permits (a snapshot).
    pub fn get_value(&self) -> u32 {
        self.word().value.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for BoundedSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedSemaphore")
            .field("value", &self.get_value())
            .finish()
    }
}
