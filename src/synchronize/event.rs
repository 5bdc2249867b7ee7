//! `Event`: a shared flag that processes can wait for.

use super::{deadline_after, region_serde};
use crate::error::Result;
use crate::sys::futex;
use crate::sys::region::{atomics_struct, magic, Region};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

atomics_struct! {
    struct EventWord {
        flag: AtomicU32,
        waiters: AtomicU32,
    }
}

/// A flag shared between processes that others can wait for (Python's
/// `multiprocessing.Event`). [`set`](Event::set) wakes every waiter.
///
/// ```
/// use multiprocess::{Event, Process};
///
/// fn signal(e: Event) {
///     e.set();
/// }
///
/// let e = Event::new()?;
/// let p = Process::new(signal, e.clone());
/// p.start()?;
/// e.wait();
/// assert!(e.is_set());
/// p.join()?;
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Clone)]
pub struct Event {
    region: Arc<Region<EventWord>>,
}

region_serde!(Event, &[magic::EVENT]);

impl Event {
    /// A new event, not set.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new() -> Result<Event> {
        Ok(Event {
            region: Arc::new(Region::new(c"multiprocess-event", magic::EVENT, 0, 1, 0)?),
        })
    }

    fn word(&self) -> &EventWord {
        self.region.header()
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.word().flag.load(Ordering::Acquire) != 0
    }

    /// Sets the flag and wakes every waiter.
    pub fn set(&self) {
        let w = self.word();
        w.flag.store(1, Ordering::SeqCst);
        if w.waiters.load(Ordering::SeqCst) > 0 {
            futex::wake_all(&w.flag);
        }
    }

    /// Clears the flag.
    pub fn clear(&self) {
        self.word().flag.store(0, Ordering::SeqCst);
    }

    /// Blocks until the flag is set.
    pub fn wait(&self) {
        self.wait_until(None);
    }

    /// Waits at most `timeout` for the flag; returns whether it is set (Python's
    /// `wait(timeout)`).
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(deadline_after(timeout))
    }

    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let w = self.word();
        if self.is_set() {
            return true;
        }
        w.waiters.fetch_add(1, Ordering::SeqCst);
        let set = loop {
            if w.flag.load(Ordering::SeqCst) != 0 {
                break true;
            }
            if futex::wait(&w.flag, 0, deadline) == futex::Wake::TimedOut {
                break self.is_set();
            }
        };
        w.waiters.fetch_sub(1, Ordering::SeqCst);
        set
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("set", &self.is_set())
            .finish()
    }
}
