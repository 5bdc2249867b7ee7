//! Synchronization primitives that work between processes (Python's
//! `multiprocessing.synchronize`): [`Lock`], [`RLock`], [`Semaphore`],
//! [`BoundedSemaphore`], [`Condition`], [`Event`] and [`Barrier`].
//!
//! Each primitive lives in a small shared-memory segment of its own (an anonymous `memfd`,
//! freed when the last process holding it lets go, so nothing can leak). Handles are cheap
//! to clone and arrive usable when placed in a [`Process`](crate::Process)'s args or sent
//! through a [`Connection`](crate::Connection).
//!
//! ```
//! use multiprocess::{Process, Value};
//!
//! fn add(args: (Value<i64>, i64)) {
//!     let (total, n) = args;
//!     for _ in 0..n {
//!         *total.lock() += 1;
//!     }
//! }
//!
//! let total = Value::new(0i64)?;
//! let ps: Vec<Process> = (0..3).map(|_| Process::new(add, (total.clone(), 1000))).collect();
//! for p in &ps { p.start()?; }
//! for p in &ps { p.join()?; }
//! assert_eq!(total.get(), 3000);
//! # Ok::<(), multiprocess::Error>(())
//! ```
//!
//! Each primitive takes one 4 KiB page and one file descriptor in every process that has
//! a handle to it (clones share theirs): a program that makes thousands of primitives may
//! need a higher `RLIMIT_NOFILE`.
//!
//! # How they work
//! The state is a few 32-bit words used with atomic instructions; a process sleeps on
//! them with a shared futex only when it has to wait. An uncontended [`Lock`] acquire is
//! one compare-and-swap and a release one swap: no system call.
//!
//! # When a process dies
//! * **Holding a [`Lock`] or [`RLock`]** (even by `SIGKILL`): the lock records its holder
//!   (thread id and start time, in one atomic word). A waiter that has waited
//!   [a short while](HOLDER_CHECK_INTERVAL) checks whether the holder still exists; if
//!   not, it takes the lock over, and its guard says so:
//!   [`LockGuard::owner_died`] is true (like `EOWNERDEAD` from a robust pthread mutex).
//!   The data the lock protected may be half-updated: check or repair it. The lock itself
//!   is fully usable again; nothing stays poisoned. A thread that ends while holding a
//!   lock counts as a dead holder too. A holder whose fate cannot be read (no `/proc`
//!   mounted, an unreadable entry) is never taken for dead: waiters keep waiting (or time
//!   out). This holds in children of every start method, including the forkserver's.
//! * **Waiting on a [`Condition`] or an [`Event`]**: a waiter holds nothing while it
//!   sleeps, so the others are unaffected.
//! * **Waiting at a [`Barrier`]**: the others notice within a short while and the barrier
//!   breaks ([`Error::BrokenBarrier`](crate::Error::BrokenBarrier)), as when a party times
//!   out, rather than wait for a party that will never come.
//! * **Holding a [`Semaphore`] permit**: a semaphore has no owner (any process may
//!   release), so a permit taken by a process that dies is lost, as in Python.
//!
//! All processes sharing a primitive must be in one pid namespace (holders are recorded
//! by thread id).

mod barrier;
mod condition;
mod event;
mod lock;
mod semaphore;

pub use barrier::Barrier;
pub use condition::{Condition, ConditionGuard};
pub use event::Event;
pub(crate) use lock::LockWord;
pub use lock::{Lock, LockGuard, RLock, RLockGuard};
pub use semaphore::{BoundedSemaphore, Semaphore, SemaphoreGuard};

use std::time::{Duration, Instant};

/// How long a waiter sleeps before it checks whether the holder it waits for (or a party
/// of a barrier) is still alive. The cost of the check is a read of `/proc/PID/stat`.
/// Queues use the same interval for their internal locks.
pub const HOLDER_CHECK_INTERVAL: Duration = crate::sys::robust::CHECK_INTERVAL;

fn deadline_after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

use crate::sys::robust::slice_end;

/// Implements Serialize/Deserialize for a handle `struct { region: Arc<Region<H>> , .. }`
/// whose only state is its region.
macro_rules! region_serde {
    ($ty:ident, $magics:expr) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.region.mapping().serialize(s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let map = crate::reduction::deserialize_sealed(d)?;
                let region = crate::sys::region::Region::from_mapping(map, $magics, None)
                    .map_err(serde::de::Error::custom)?;
                Ok($ty {
                    region: std::sync::Arc::new(region),
                })
            }
        }
    };
}
pub(crate) use region_serde;
