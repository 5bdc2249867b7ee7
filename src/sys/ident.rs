//! Who holds a lock: the calling thread's identity, cheap enough for an uncontended acquire,
//! and a liveness probe that sees through pid reuse.
//!
//! An identity is the thread id (Linux tids share the pid number space, and the main
//! thread's tid is the pid) plus the low 32 bits of the thread's start time in clock ticks
//! since boot (`/proc/thread-self/stat`, field 22). A waiter that suspects a dead holder
//! reads `/proc/TID/stat`: no entry, a zombie, or a different start time (the number was
//! reused by a newer thread) means the recorded holder is gone.
//!
//! The identity is cached per thread. A forked child inherits the forking thread's cache,
//! so a `pthread_atfork` child handler clears it (the Fork start method forks through
//! glibc; the forkserver's raw `clone` runs on a thread that never takes a lock).
//! All processes that share a primitive must live in one pid namespace.

use std::cell::Cell;
use std::sync::Once;

/// A thread's identity as stored in a lock word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ident {
    /// Thread id (never 0, below 2^30).
    pub tid: u32,
    /// Low 32 bits of the start time in clock ticks, 0 if unknown.
    pub start: u32,
}

thread_local! {
    // (start << 32) | tid; 0 = not computed yet in this thread (of this process).
    static ME: Cell<u64> = const { Cell::new(0) };
}

static ATFORK: Once = Once::new();

extern "C" fn forget_in_child() {
    let _ = ME.try_with(|c| c.set(0));
}

/// The calling thread's identity (computed once per thread).
#[inline]
pub(crate) fn me() -> Ident {
    let v = ME.with(Cell::get);
    if v != 0 {
        return Ident {
            tid: v as u32,
            start: (v >> 32) as u32,
        };
    }
    compute()
}

#[cold]
fn compute() -> Ident {
    ATFORK.call_once(|| {
        // SAFETY: registers a plain function that only resets a const-initialised
        // thread-local cell (no allocation, no locks): sound in a freshly forked child.
        unsafe {
            libc::pthread_atfork(None, None, Some(forget_in_child));
        }
    });
    // SAFETY: gettid has no memory effects and cannot fail.
    let tid = unsafe { libc::gettid() } as u32;
    let start = std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| parse_stat(&s))
        .map(|(_, start)| start as u32)
        .unwrap_or(0);
    ME.with(|c| c.set((u64::from(start) << 32) | u64::from(tid)));
    Ident { tid, start }
}

/// `(state letter, start time)` of process or thread `id`, from `/proc/ID/stat`; `None`
/// if there is no such entry (or it cannot be read).
pub(crate) fn proc_stat(id: u32) -> Option<(char, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{id}/stat")).ok()?)
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

/// Whether the thread recorded as `tid` with start time `start` (0 = unknown) has ended.
/// Errs on the side of "alive" when /proc cannot tell.
pub(crate) fn is_gone(tid: u32, start: u32) -> bool {
    // Without a mounted /proc nothing can be told: never declare a holder dead then.
    if tid == 0 || !std::path::Path::new("/proc/self/stat").exists() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{tid}/stat")) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        Ok(text) => match parse_stat(&text) {
            None => false,
            Some((state, now)) => {
                matches!(state, 'Z' | 'X' | 'x') || (start != 0 && now as u32 != start)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_ours_and_alive() {
        let me = me();
        assert_ne!(me.tid, 0);
        assert!(!is_gone(me.tid, me.start));
        // A wrong start time means "someone else had this number".
        assert!(is_gone(me.tid, me.start.wrapping_add(1)) || me.start == 0);
        // A thread that ended is gone.
        assert_eq!(
            parent_of(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        let t = std::thread::spawn(me_fn).join().unwrap();
        assert_ne!(t.tid, me.tid);
        assert!(is_gone(t.tid, t.start));
    }

    fn me_fn() -> Ident {
        me()
    }

    #[test]
    fn parses_names_with_parens() {
        let s = "42 (a) b) (c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 x";
        assert_eq!(parse_stat(s), Some(('S', 777)));
    }
}
