//! The one crash-safe, process-shared lock word, used by every shared primitive that has
//! a holder (`Lock`, `RLock`, the internal locks of `Barrier` and `Value`, and the producer
//! and consumer locks of every queue).
//!
//! The word is placed in shared memory (all zero = free) and holds the holder's whole
//! identity ([`Holder`](super::ident::Holder): thread id and start time) in one atomic
//! 64-bit value, with the top bit saying that someone may be asleep on the lock. Taking
//! the lock is one compare-and-swap, releasing it one swap: no system call unless someone
//! waits. A waiter sleeps on a separate 32-bit futex sequence word, in slices of
//! [`CHECK_INTERVAL`]; after each slice it probes the holder with
//! [`ident::is_gone`](super::ident::is_gone) and, if the holder is gone (killed, even by
//! `SIGKILL`, or a thread that ended), takes the lock over with a compare-and-swap from
//! exactly the word it probed, and is told so ([`Locked::OwnerDied`]) so that it can
//! repair what the dead holder left half-done. A holder the probe cannot judge is never
//! taken for dead. How the identity survives every kind of fork is told in
//! [`ident`](super::ident).
//!
//! (glibc's robust `pthread_mutex_t` is not used: it relies on glibc's per-thread robust
//! list, which the forkserver's raw `clone` children do not set up afresh.)

use super::futex::{self, Wake};
use super::ident::{self, Holder, FREE_BIT};
use super::region::atomics_struct;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

/// How a lock call obtained the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locked {
    /// The previous holder released it normally.
    Clean,
    /// The previous holder died holding it; the state it protects may be half-updated.
    OwnerDied,
}

/// How long a waiter sleeps before it probes whether the holder is still alive.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_millis(100);

const WAITERS: u64 = FREE_BIT;
const SPINS: u32 = 100;

atomics_struct! {
    /// A robust, process-shared lock, to be placed in shared memory (all zero = free). It
    /// has no guard: the caller pairs every successful lock with [`RobustLock::unlock`].
    pub(crate) struct RobustLock {
        /// 0 when free, else the holder's identity, with [`WAITERS`] when someone may sleep.
        state: AtomicU64,
        /// Bumped by a release that saw [`WAITERS`]; what waiters sleep on.
        seq: AtomicU32,
        _spare: AtomicU32,
    }
}

/// The end of the next sleep: the deadline, or sooner for a liveness probe.
pub(crate) fn slice_end(deadline: Option<Instant>) -> Instant {
    let slice = Instant::now() + CHECK_INTERVAL;
    match deadline {
        Some(d) if d < slice => d,
        _ => slice,
    }
}

impl RobustLock {
    /// Takes the lock if it is free, without probing a holder.
    #[inline]
    pub(crate) fn try_lock_free(&self) -> bool {
        let me = ident::me().word();
        self.state.compare_exchange(0, me, Acquire, Relaxed).is_ok()
    }

    /// Takes the lock if it is free or its holder is gone; `None` if a live (or unknown)
    /// holder keeps it.
    pub(crate) fn try_lock(&self) -> Option<Locked> {
        let me = ident::me().word();
        match self.state.compare_exchange(0, me, Acquire, Relaxed) {
            Ok(_) => Some(Locked::Clean),
            Err(cur) => self.take_from_gone(cur, me),
        }
    }

    /// Locks, waiting until `deadline` (for ever if `None`); `None` if the deadline passed
    /// first. Before giving up it probes the holder once more.
    #[inline]
    pub(crate) fn lock(&self, deadline: Option<Instant>) -> Option<Locked> {
        let me = ident::me().word();
        if self.state.compare_exchange(0, me, Acquire, Relaxed).is_ok() {
            return Some(Locked::Clean);
        }
        self.lock_slow(me, deadline)
    }

    #[cold]
    fn lock_slow(&self, me: u64, deadline: Option<Instant>) -> Option<Locked> {
        for _ in 0..SPINS {
            std::hint::spin_loop();
            if self.state.load(Relaxed) == 0
                && self.state.compare_exchange(0, me, Acquire, Relaxed).is_ok()
            {
                return Some(Locked::Clean);
            }
        }
        loop {
            let s = self.state.load(Relaxed);
            if s == 0 {
                // Others may sleep: keep the waiters bit so that our release wakes one.
                if self
                    .state
                    .compare_exchange(0, me | WAITERS, Acquire, Relaxed)
                    .is_ok()
                {
                    return Some(Locked::Clean);
                }
                continue;
            }
            if s & WAITERS == 0
                && self
                    .state
                    .compare_exchange(s, s | WAITERS, Relaxed, Relaxed)
                    .is_err()
            {
                continue;
            }
            let seq = self.seq.load(Acquire);
            if self.state.load(Acquire) != s | WAITERS {
                continue;
            }
            if futex::wait(&self.seq, seq, Some(slice_end(deadline))) == Wake::TimedOut {
                if let Some(l) = self.take_from_gone(s | WAITERS, me | WAITERS) {
                    return Some(l);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return None;
                }
            }
        }
    }

    /// If the holder named in `seen` is gone, replaces exactly that word with `mine`.
    fn take_from_gone(&self, seen: u64, mine: u64) -> Option<Locked> {
        let holder = Holder::from_word(seen)?;
        if !ident::is_gone(holder) {
            return None;
        }
        let mine = mine | (seen & WAITERS);
        self.state
            .compare_exchange(seen, mine, Acquire, Relaxed)
            .ok()
            .map(|_| Locked::OwnerDied)
    }

    /// Releases the lock (whoever holds it: the caller decides who may).
    #[inline]
    pub(crate) fn unlock(&self) {
        if self.state.swap(0, Release) & WAITERS != 0 {
            self.seq.fetch_add(1, Release);
            futex::wake(&self.seq, 1);
        }
    }

    /// The holder right now (a snapshot), `None` when free.
    pub(crate) fn holder(&self) -> Option<Holder> {
        Holder::from_word(self.state.load(Relaxed))
    }

    /// Whether the calling thread holds the lock.
    pub(crate) fn held_by_me(&self) -> bool {
        self.holder() == Some(ident::me())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> RobustLock {
        RobustLock {
            state: AtomicU64::new(0),
            seq: AtomicU32::new(0),
            _spare: AtomicU32::new(0),
        }
    }

    #[test]
    fn lock_try_lock_unlock_and_gone_holder() {
        let m = fresh();
        assert_eq!(m.lock(None), Some(Locked::Clean));
        assert!(m.held_by_me());
        assert_eq!(m.try_lock(), None);
        assert!(!m.try_lock_free());
        // Our own live hold is never taken over, even when out of time.
        let deadline = Instant::now() + Duration::from_millis(30);
        assert_eq!(m.lock(Some(deadline)), None);
        assert!(Instant::now() >= deadline);
        m.unlock();
        assert_eq!(m.holder(), None);
        assert_eq!(m.try_lock(), Some(Locked::Clean));
        m.unlock();

        // A lock held by a thread that ended is taken over, by lock and by try_lock.
        let gone = std::thread::spawn(ident::me).join().unwrap();
        m.state.store(gone.word() | WAITERS, Relaxed);
        assert_eq!(m.lock(None), Some(Locked::OwnerDied));
        assert!(m.held_by_me());
        m.unlock();
        m.state.store(gone.word(), Relaxed);
        assert_eq!(m.lock(Some(Instant::now())), Some(Locked::OwnerDied));
        m.unlock();
        m.state.store(gone.word(), Relaxed);
        assert_eq!(m.try_lock(), Some(Locked::OwnerDied));
        m.unlock();
    }

    #[test]
    fn a_holder_the_probe_cannot_judge_is_never_taken_over() {
        // A live thread recorded without its start time (as when /proc could not be read
        // when it took the lock): nothing tells whether the number was reused, so the
        // holder counts as alive, through a deadline and through try_lock.
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(ident::me().tid()).unwrap();
            let _ = stopped.recv();
        });
        let tid = rx.recv().unwrap();
        let m = fresh();
        m.state.store(u64::from(tid), Relaxed);
        let deadline = Instant::now() + Duration::from_millis(250);
        assert_eq!(m.lock(Some(deadline)), None);
        assert_eq!(m.try_lock(), None);
        assert_eq!(m.holder().map(|h| h.tid()), Some(tid));
        drop(stop);
        t.join().unwrap();
    }

    #[test]
    fn a_waiter_is_woken_by_the_release() {
        let m = std::sync::Arc::new(fresh());
        assert_eq!(m.lock(None), Some(Locked::Clean));
        let m2 = m.clone();
        let t = std::thread::spawn(move || {
            let got = m2.lock(Some(Instant::now() + Duration::from_secs(30)));
            m2.unlock();
            got
        });
        while m.state.load(Relaxed) & WAITERS == 0 {
            std::thread::yield_now();
        }
        m.unlock();
        assert_eq!(t.join().unwrap(), Some(Locked::Clean));
    }
}
