//! `Barrier`: a meeting point for a fixed number of parties.

use super::lock::LockWord;
use super::{deadline_after, region_serde, slice_end};
use crate::error::{Error, Result};
use crate::sys::futex;
use crate::sys::ident;
use crate::sys::region::{atomics_struct, magic, Region};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many past generations remember whether they passed or broke.
const HISTORY: usize = 64;

atomics_struct! {
    struct BarrierWord {
        /// Guards every field below (and the slots).
        lock: LockWord,
        parties: AtomicU32,
        /// Parties waiting in the current generation.
        count: AtomicU32,
        /// The generation number; bumped (and waiters woken) when a generation ends.
        gen: AtomicU32,
        /// Non-zero while broken (until `reset`).
        broken: AtomicU32,
    }
}

// Payload (u32 words): HISTORY outcomes, then two words (the low and high halves of its
// holder identity) per party.
// An outcome word is `gen << 1 | broke`.

/// A barrier for a fixed number of processes (Python's `multiprocessing.Barrier`):
/// each [`wait`](Barrier::wait) blocks until `parties` of them have called it, then all
/// return at once, each with a different arrival index in `0..parties`.
///
/// A barrier breaks ([`Error::BrokenBarrier`] for every waiter, now and until
/// [`reset`](Barrier::reset)) when a wait times out, when [`abort`](Barrier::abort) is
/// called, or when a process dies while waiting at it (the others notice within
/// [`HOLDER_CHECK_INTERVAL`](super::HOLDER_CHECK_INTERVAL)), so a lost party never
/// leaves the others waiting for ever.
///
/// ```
/// use multiprocess::{Barrier, Process};
///
/// fn meet(b: Barrier) {
///     b.wait().unwrap();
/// }
///
/// let b = Barrier::new(2)?;
/// let p = Process::new(meet, b.clone());
/// p.start()?;
/// let index = b.wait()?;
/// assert!(index < 2);
/// p.join()?;
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Clone)]
pub struct Barrier {
    region: Arc<Region<BarrierWord>>,
}

region_serde!(Barrier, &[magic::BARRIER]);

impl Barrier {
    /// A barrier for `parties` processes (or threads); at least 1.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left). [`Error::InvalidArgument`] for zero parties.
    pub fn new(parties: u32) -> Result<Barrier> {
        if parties == 0 {
            return Err(Error::InvalidArgument(
                "a barrier needs at least one party".into(),
            ));
        }
        let region = Region::<BarrierWord>::new(
            c"multiprocess-barrier",
            magic::BARRIER,
            4,
            4,
            HISTORY + 2 * parties as usize,
        )?;
        region.header().parties.store(parties, Ordering::Release);
        Ok(Barrier {
            region: Arc::new(region),
        })
    }

    fn word(&self) -> &BarrierWord {
        self.region.header()
    }

    fn history(&self) -> &[AtomicU32] {
        &self.region.atomics()[..HISTORY]
    }

    fn slots(&self) -> &[AtomicU32] {
        &self.region.atomics()[HISTORY..]
    }

    /// The number of parties.
    pub fn parties(&self) -> u32 {
        self.word().parties.load(Ordering::Relaxed)
    }

    /// How many are waiting now.
    pub fn n_waiting(&self) -> u32 {
        self.word().count.load(Ordering::Relaxed)
    }

    /// Whether the barrier is broken.
    pub fn broken(&self) -> bool {
        self.word().broken.load(Ordering::Acquire) != 0
    }

    /// Waits for the other parties; returns this arrival's index (0 for the first to
    /// arrive, `parties - 1` for the one that lets everybody go).
    ///
    /// # Errors
    /// [`Error::BrokenBarrier`] if the barrier is or becomes broken while waiting (a timeout, an `abort`, a party that died).
    pub fn wait(&self) -> Result<u32> {
        self.wait_until(None)
    }

    /// As [`wait`](Self::wait), for at most `timeout`; then the barrier breaks and
    /// [`Error::BrokenBarrier`] is returned, here and to every other waiter.
    ///
    /// # Errors
    /// [`Error::BrokenBarrier`] here and for every other waiter if `timeout` passes first, and as for [`wait`](Self::wait).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<u32> {
        self.wait_until(deadline_after(timeout))
    }

    /// Takes the internal lock; a holder that died mid-update breaks the barrier.
    fn enter(&self) -> Inner<'_> {
        let w = self.word();
        let died = w.lock.lock(None).unwrap_or(false);
        let inner = Inner { b: self };
        if died {
            inner.end_generation(true);
        }
        inner
    }

    fn wait_until(&self, deadline: Option<Instant>) -> Result<u32> {
        let w = self.word();
        let me = ident::me();
        let (gen, index) = {
            let inner = self.enter();
            if w.broken.load(Ordering::Relaxed) != 0 {
                return Err(Error::BrokenBarrier);
            }
            let gen = w.gen.load(Ordering::Relaxed);
            let index = w.count.load(Ordering::Relaxed);
            let parties = w.parties.load(Ordering::Relaxed);
            if index + 1 >= parties {
                inner.end_generation(false);
                return Ok(index);
            }
            let slots = self.slots();
            // Written and read only under the barrier's lock, so two halves are fine.
            slots[2 * index as usize].store(me.word() as u32, Ordering::Relaxed);
            slots[2 * index as usize + 1].store((me.word() >> 32) as u32, Ordering::Relaxed);
            w.count.store(index + 1, Ordering::Relaxed);
            (gen, index)
        };
        loop {
            if w.gen.load(Ordering::Acquire) != gen {
                return self.outcome(gen, index);
            }
            if futex::wait(&w.gen, gen, Some(slice_end(deadline))) == futex::Wake::TimedOut {
                let inner = self.enter();
                if w.gen.load(Ordering::Relaxed) != gen {
                    continue;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) || inner.a_party_died() {
                    inner.end_generation(true);
                }
            }
        }
    }

    fn outcome(&self, gen: u32, index: u32) -> Result<u32> {
        let h = self.history()[gen as usize % HISTORY].load(Ordering::Acquire);
        if h >> 1 == gen & (u32::MAX >> 1) && h & 1 == 1 {
            Err(Error::BrokenBarrier)
        } else {
            Ok(index)
        }
    }

    /// Breaks the barrier: current and future waiters get [`Error::BrokenBarrier`] until
    /// [`reset`](Self::reset).
    pub fn abort(&self) {
        let inner = self.enter();
        inner.end_generation(true);
    }

    /// Returns the barrier to its empty, unbroken state; parties waiting now get
    /// [`Error::BrokenBarrier`].
    pub fn reset(&self) {
        let inner = self.enter();
        if self.word().count.load(Ordering::Relaxed) > 0 {
            inner.end_generation(true);
        }
        self.word().broken.store(0, Ordering::Release);
    }
}

/// The barrier with its internal lock held.
struct Inner<'a> {
    b: &'a Barrier,
}

impl Inner<'_> {
    /// Ends the current generation, passed or broken, and wakes its waiters.
    fn end_generation(&self, broke: bool) {
        let w = self.b.word();
        let gen = w.gen.load(Ordering::Relaxed);
        self.b.history()[gen as usize % HISTORY].store(
            ((gen & (u32::MAX >> 1)) << 1) | broke as u32,
            Ordering::Release,
        );
        if broke {
            w.broken.store(1, Ordering::Release);
        }
        w.count.store(0, Ordering::Relaxed);
        w.gen.store(gen.wrapping_add(1), Ordering::Release);
        futex::wake_all(&w.gen);
    }

    fn a_party_died(&self) -> bool {
        let w = self.b.word();
        let n = w.count.load(Ordering::Relaxed) as usize;
        let slots = self.b.slots();
        (0..n).any(|i| {
            let word = u64::from(slots[2 * i].load(Ordering::Relaxed))
                | u64::from(slots[2 * i + 1].load(Ordering::Relaxed)) << 32;
            ident::Holder::from_word(word).is_some_and(ident::is_gone)
        })
    }
}

impl Drop for Inner<'_> {
    fn drop(&mut self) {
        self.b.word().lock.unlock();
    }
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("parties", &self.parties())
            .field("n_waiting", &self.n_waiting())
            .field("broken", &self.broken())
            .finish()
    }
}
