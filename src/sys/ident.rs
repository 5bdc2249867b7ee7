//! Who holds a shared lock or an in-flight item: the calling thread's identity packed in one
//! 64-bit word, cheap enough for an uncontended acquire, and the one liveness probe that
//! tells whether such a holder is gone.
//!
//! # The holder word
//! A [`Holder`] is the thread id (Linux tids share the pid number space; the main thread's
//! tid is the pid) in the low [`TID_BITS`] bits, above it the low bits of the thread's start
//! time in clock ticks since boot (`/proc/thread-self/stat`, field 22; 0 when it cannot be
//! read), and the top bit left free for the owner of the word (a lock's "waiters" bit). The
//! whole identity is one atomic value, so a waiter that probed a holder and then
//! compare-and-swaps the word takes over exactly the holder it probed, never a newer one.
//!
//! # The probe and the rule for "unknown"
//! [`is_gone`] reads `/proc/TID/stat`: no such entry, a zombie, or a different start time
//! (the number was reused by a newer thread) means the recorded holder is gone. Anything
//! it cannot tell — no `/proc` mounted, an unreadable or unparsable entry — counts as
//! **alive**: a holder is never taken for dead on a guess. (Then waiters keep waiting, or
//! time out, as they would behind a live holder.) All processes that share a primitive must
//! live in one pid namespace.
//!
//! # Fork
//! The identity is cached per thread. A child made by any kind of fork — `fork(2)` for the
//! Fork start method, the forkserver's raw `clone` (which runs no `pthread_atfork`
//! handlers), or a spawned child (a fresh image, nothing inherited) — must never use the
//! cache it inherited from its parent. The cache is therefore valid only while a mark in a
//! private page made with `MADV_WIPEONFORK` is set: the kernel zeroes that page in every
//! child that does not share the parent's memory, whatever made it, so the first use in a
//! child recomputes. Where the kernel lacks `MADV_WIPEONFORK` (before Linux 4.14), every
//! use compares the cached thread id with `gettid()` instead (a new process's thread never
//! has its parent's thread id).

use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering::*};

/// Bits of a [`Holder`] that hold the thread id (Linux caps pids at 2^22).
pub(crate) const TID_BITS: u32 = 23;
const TID_MASK: u64 = (1 << TID_BITS) - 1;
/// Bits of the start time kept (in clock ticks: centuries at 100 Hz).
const START_BITS: u32 = 40;
const START_MASK: u64 = (1 << START_BITS) - 1;
/// The top bit of a holder word, free for the word's owner (never set in a [`Holder`]).
pub(crate) const FREE_BIT: u64 = 1 << 63;

/// A thread's identity as stored in shared memory: never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Holder(u64);

impl Holder {
    fn new(tid: u32, start: u64) -> Holder {
        Holder((u64::from(tid) & TID_MASK) | ((start & START_MASK) << TID_BITS))
    }

    /// The identity in a word read from shared memory (its [`FREE_BIT`] ignored); `None`
    /// for a word that names nobody.
    pub(crate) fn from_word(w: u64) -> Option<Holder> {
        let w = w & !FREE_BIT;
        (w & TID_MASK != 0).then_some(Holder(w))
    }

    /// The packed word (without [`FREE_BIT`]).
    pub(crate) fn word(self) -> u64 {
        self.0
    }

    /// The thread id.
    pub(crate) fn tid(self) -> u32 {
        (self.0 & TID_MASK) as u32
    }

    fn start(self) -> u64 {
        self.0 >> TID_BITS
    }
}

thread_local! {
    // This thread's Holder word; 0 = not computed yet (in this process).
    static ME: Cell<u64> = const { Cell::new(0) };
}

/// The wipe-on-fork page: its first word is non-zero once this process has computed an
/// identity (see the module docs). Null until made; `NO_PAGE` set if it cannot be made.
static MARK: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
static NO_PAGE: AtomicU32 = AtomicU32::new(0);

/// The calling thread's identity.
#[inline]
pub(crate) fn me() -> Holder {
    let v = ME.with(Cell::get);
    if v != 0 {
        let p = MARK.load(Relaxed);
        // SAFETY: a published page is never unmapped; in a child the kernel wiped it to
        // zero, which is a valid AtomicU64.
        if !p.is_null() && unsafe { &*p }.load(Relaxed) != 0 {
            return Holder(v);
        }
    }
    compute(v)
}

#[cold]
fn compute(cached: u64) -> Holder {
    let mark = mark_page();
    // SAFETY: gettid has no memory effects and cannot fail.
    let tid = unsafe { libc::gettid() } as u32;
    if mark.is_none() && cached != 0 && Holder(cached).tid() == tid {
        return Holder(cached);
    }
    let start = std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| parse_stat(&s))
        .map_or(0, |(_, start)| start);
    let h = Holder::new(tid, start);
    ME.with(|c| c.set(h.0));
    if let Some(m) = mark {
        m.store(1, Relaxed);
    }
    h
}

fn mark_page() -> Option<&'static AtomicU64> {
    let p = MARK.load(Acquire);
    if !p.is_null() {
        // SAFETY: a published page is never unmapped (see `me`).
        return Some(unsafe { &*p });
    }
    if NO_PAGE.load(Relaxed) != 0 {
        return None;
    }
    // SAFETY: a fresh private anonymous page, checked against MAP_FAILED; madvise only
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
            NO_PAGE.store(1, Relaxed);
            return None;
        }
        if libc::madvise(page, 4096, libc::MADV_WIPEONFORK) != 0 {
            libc::munmap(page, 4096);
            NO_PAGE.store(1, Relaxed);
            return None;
        }
        page.cast::<AtomicU64>()
    };
    match MARK.compare_exchange(std::ptr::null_mut(), page, AcqRel, Acquire) {
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

/// Whether the holder recorded in `h` has ended: its `/proc` entry is gone, a zombie, or
/// belongs to a newer thread (another start time). Anything the probe cannot tell counts
/// as alive (see the module docs).
pub(crate) fn is_gone(h: Holder) -> bool {
    // Without a mounted /proc nothing can be told: never declare a holder dead then.
    if !std::path::Path::new("/proc/self/stat").exists() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{}/stat", h.tid())) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        Ok(text) => match parse_stat(&text) {
            None => false,
            Some((state, now)) => {
                matches!(state, 'Z' | 'X' | 'x')
                    || (h.start() != 0 && now & START_MASK != h.start())
            }
        },
    }
}

/// `(state letter, start time)` from the text of a `/proc/*/stat` file.
fn parse_stat(s: &str) -> Option<(char, u64)> {
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=21 lie between the state (3) and the start time (22).
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The parent pid of process `pid` (field 4 of `/proc/PID/stat`).
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_ours_and_alive() {
        let me = me();
        assert_eq!(me, super::me());
        assert_ne!(me.tid(), 0);
        assert!(!is_gone(me));
        // A wrong start time means "someone else had this number".
        if me.start() != 0 {
            assert!(is_gone(Holder::new(me.tid(), me.start() + 1)));
        }
        assert_eq!(Holder::from_word(me.word() | FREE_BIT), Some(me));
        assert_eq!(Holder::from_word(FREE_BIT), None);
        assert_eq!(
            parent_of(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        // A thread that ended is gone.
        let t = std::thread::spawn(super::me).join().unwrap();
        assert_ne!(t.tid(), me.tid());
        assert!(is_gone(t));
    }

    #[test]
    fn parses_names_with_parens() {
        let s = "42 (a) b) (c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 x";
        assert_eq!(parse_stat(s), Some(('S', 777)));
    }
}
