//! Futexes on 32-bit words in shared memory (`FUTEX_WAIT`/`FUTEX_WAKE` without the private
//! flag, so that waiters in different processes that map the same page meet).
//!
//! These are the only blocking primitives the synchronisation types use; the uncontended
//! paths above them are plain atomics and make no system call.

use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

/// Why [`wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Woken, or the word no longer held `expected`, or a signal interrupted the wait:
    /// the caller re-checks its condition.
    Woken,
    /// The deadline passed.
    TimedOut,
}

/// Sleeps while `*word == expected`, until woken or `deadline` (if any) passes.
/// Spurious returns are possible; callers loop on their own condition.
pub(crate) fn wait(word: &AtomicU32, expected: u32, deadline: Option<Instant>) -> Wake {
    let ts;
    let tsp = match deadline {
        None => std::ptr::null(),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Wake::TimedOut;
            }
            ts = timespec(left);
            &ts as *const libc::timespec
        }
    };
    // SAFETY: `word` is a valid, aligned 32-bit atomic for the duration of the call; a
    // shared (non-private) FUTEX_WAIT only reads it. The timeout pointer is null or points
    // to a live timespec (relative, as FUTEX_WAIT takes it).
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            tsp,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT) {
        return Wake::TimedOut;
    }
    Wake::Woken
}

/// Wakes up to `n` waiters on `word`; returns how many were woken.
pub(crate) fn wake(word: &AtomicU32, n: u32) -> usize {
    let n = n.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: FUTEX_WAKE only uses the address of `word` as a key; it touches no memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if r < 0 {
        0
    } else {
        r as usize
    }
}

/// Wakes every waiter on `word`.
pub(crate) fn wake_all(word: &AtomicU32) -> usize {
    wake(word, i32::MAX as u32)
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    #[test]
    fn wait_times_out_and_wake_wakes() {
        let w = AtomicU32::new(0);
        let d = Instant::now() + Duration::from_millis(20);
        assert_eq!(wait(&w, 0, Some(d)), Wake::TimedOut);
        assert!(Instant::now() >= d);
        // A changed word returns at once.
        assert_eq!(wait(&w, 1, None), Wake::Woken);

        let w = Arc::new(AtomicU32::new(0));
        let w2 = w.clone();
        let t = std::thread::spawn(move || {
            while w2.load(Ordering::Acquire) == 0 {
                wait(&w2, 0, Some(Instant::now() + Duration::from_secs(10)));
            }
        });
        w.store(1, Ordering::Release);
        wake_all(&w);
        t.join().unwrap();
    }
}
