//! The async core: the one place where the crate's futures wait, so that no future ever
//! blocks the thread that polls it and no thread is started per `.await`.
//!
//! Two small threads per process, each started the first time it is needed:
//!
//! * **the descriptor thread** waits in `epoll_wait` for every armed descriptor (pidfds of
//!   children, connection sockets) and wakes the task that armed it. A [`FdWatch`] holds
//!   its own duplicate of the descriptor, registered one-shot and level-triggered: arming
//!   after a failed non-blocking attempt cannot miss an event, since a descriptor that is
//!   already ready reports at once.
//! * **the futex thread** waits in one `futex_waitv` on every armed shared-memory word
//!   (queues in shared memory, whose producers in other processes signal with
//!   `FUTEX_WAKE`), plus a private control word that tells it the set changed. Chosen over
//!   a notification descriptor because it changes nothing in the shared layout or on the
//!   producers' path: a producer already wakes the word when anyone waits on it, so a
//!   waiting future costs the same as a waiting thread. `futex_waitv` takes up to 128
//!   words; a word past that is looked at every few milliseconds instead.
//!
//! Both threads only wake tasks; the futures do all the work when polled. A forked child
//! gets fresh threads (the state is [`PerProcess`]).

use super::fd::cvt;
use super::per_process::PerProcess;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which readiness a [`FdWatch`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ready {
    /// Readable, hung up or in error (a pidfd is readable once its process exits).
    Read,
    /// Writable, hung up or in error.
    Write,
}

struct Reactor {
    next_token: AtomicU64,
    epoll: OnceLock<io::Result<OwnedFd>>,
    fd_wakers: Mutex<HashMap<u64, Waker>>,
    futex: OnceLock<io::Result<()>>,
    words: Mutex<HashMap<u64, WordWait>>,
    /// Bumped (and woken) whenever `words` changes, so that the futex thread re-reads it.
    control: AtomicU32,
}

static REACTOR: PerProcess<Reactor> = PerProcess::new(|| Reactor {
    next_token: AtomicU64::new(1),
    epoll: OnceLock::new(),
    fd_wakers: Mutex::new(HashMap::new()),
    futex: OnceLock::new(),
    words: Mutex::new(HashMap::new()),
    control: AtomicU32::new(0),
});

fn reactor() -> &'static Reactor {
    REACTOR.get()
}

impl Reactor {
    fn token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    fn epoll(&'static self) -> io::Result<BorrowedFd<'static>> {
        let r = self.epoll.get_or_init(|| {
            // SAFETY: epoll_create1 returns a fresh descriptor that we own from here on.
            let ep =
                unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
            let fd = ep.as_raw_fd();
            std::thread::Builder::new()
                .name("multiprocess-io".into())
                .spawn(move || self.run_epoll(fd))?;
            Ok(ep)
        });
        match r {
            Ok(fd) => Ok(std::os::fd::AsFd::as_fd(fd)),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    fn run_epoll(&'static self, ep: libc::c_int) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: `events` is a valid, exclusively borrowed array of its length; `ep`
            // is the reactor's epoll descriptor, which is never closed (the reactor lives
            // for the whole process).
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let woken: Vec<Waker> = {
                let mut w = lock(&self.fd_wakers);
                events[..n as usize]
                    .iter()
                    .filter_map(|e| w.remove(&{ e.u64 }))
                    .collect()
            };
            woken.into_iter().for_each(Waker::wake);
        }
    }
}

/// A one-shot wait for a descriptor, re-armed on each poll that found nothing to do.
/// Dropping it removes the registration (and its waker).
#[derive(Debug, Default)]
pub(crate) struct FdWatch {
    armed: Option<(u64, OwnedFd)>,
}

impl FdWatch {
    /// A watch that is not armed yet.
    pub(crate) fn new() -> FdWatch {
        FdWatch::default()
    }

    /// Wakes `waker` once `fd` is ready for `ready` (at once if it already is). Call it
    /// after a non-blocking attempt failed, then return `Pending`. Always the same `fd`
    /// for one watch.
    pub(crate) fn arm(
        &mut self,
        fd: BorrowedFd<'_>,
        ready: Ready,
        waker: &Waker,
    ) -> io::Result<()> {
        let r = reactor();
        let ep = r.epoll()?;
        let events = libc::EPOLLONESHOT as u32
            | libc::EPOLLHUP as u32
            | libc::EPOLLERR as u32
            | match ready {
                Ready::Read => libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32,
                Ready::Write => libc::EPOLLOUT as u32,
            };
        let (op, token, raw) = match &self.armed {
            Some((token, dup)) => (libc::EPOLL_CTL_MOD, *token, dup.as_raw_fd()),
            None => {
                // Our own duplicate: the caller's descriptor may be registered by another
                // watch too (epoll refuses one descriptor twice), or closed while we wait.
                let dup = super::fd::dup_cloexec(fd, 3)?;
                let token = r.token();
                let raw = dup.as_raw_fd();
                self.armed = Some((token, dup));
                (libc::EPOLL_CTL_ADD, token, raw)
            }
        };
        lock(&r.fd_wakers).insert(token, waker.clone());
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the call; `raw` is our open duplicate.
        let res = cvt(unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, raw, &mut ev) });
        if let Err(e) = res {
            lock(&r.fd_wakers).remove(&token);
            if op == libc::EPOLL_CTL_ADD {
                self.armed = None;
            }
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for FdWatch {
    fn drop(&mut self) {
        if let Some((token, dup)) = self.armed.take() {
            let r = reactor();
            if let Ok(ep) = r.epoll() {
                // SAFETY: removes our own open duplicate from the reactor's epoll set; a null
                // event is allowed for EPOLL_CTL_DEL. Errors (already gone) do not matter.
                unsafe {
                    libc::epoll_ctl(
                        ep.as_raw_fd(),
                        libc::EPOLL_CTL_DEL,
                        dup.as_raw_fd(),
                        std::ptr::null_mut(),
                    );
                }
            }
            lock(&r.fd_wakers).remove(&token);
        }
    }
}

// ---------------------------------------------------------------------- futex words

/// Something that owns a 32-bit futex word (typically in shared memory) and keeps it
/// mapped for as long as it lives. The futex thread holds it while it waits on the word.
pub(crate) trait FutexWord: Send + Sync + 'static {
    /// The word.
    fn word(&self) -> &AtomicU32;
}

struct WordWait {
    host: Arc<dyn FutexWord>,
    expected: u32,
    deadline: Option<Instant>,
    waker: Waker,
}

/// A wait for a futex word to change from an expected value (or for a deadline), owned by
/// a future. Dropping it removes the registration.
#[derive(Debug, Default)]
pub(crate) struct FutexWatch {
    token: Option<u64>,
}

/// How often words past `futex_waitv`'s limit, or the whole set if the call is not
/// available, are looked at.
const FALLBACK_TICK: Duration = Duration::from_millis(5);
/// `FUTEX_WAITV_MAX`: the most words one `futex_waitv` takes (one is the control word).
const WAITV_MAX: usize = 128;
/// `FUTEX2_SIZE_U32` (shared, not private: the words live in shared mappings).
const FUTEX2_SIZE_U32: u32 = 0x02;

/// `struct futex_waitv` of `<linux/futex.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

impl FutexWatch {
    /// A watch that is not armed yet.
    pub(crate) fn new() -> FutexWatch {
        FutexWatch::default()
    }

    /// Wakes `waker` once `host.word()` no longer holds `expected` (at once if it already
    /// does not), or once `deadline` passes. Spurious wakes are possible: the caller
    /// re-checks its condition when polled.
    pub(crate) fn arm(
        &mut self,
        host: Arc<dyn FutexWord>,
        expected: u32,
        deadline: Option<Instant>,
        waker: &Waker,
    ) -> io::Result<()> {
        let r = reactor();
        r.futex.get_or_init(|| {
            std::thread::Builder::new()
                .name("multiprocess-futex".into())
                .spawn(move || r.run_futex())
                .map(drop)
        });
        if let Some(Err(e)) = r.futex.get() {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        let token = *self.token.get_or_insert_with(|| r.token());
        lock(&r.words).insert(
            token,
            WordWait {
                host,
                expected,
                deadline,
                waker: waker.clone(),
            },
        );
        r.poke();
        Ok(())
    }
}

impl Drop for FutexWatch {
    fn drop(&mut self) {
        if let Some(token) = self.token {
            let r = reactor();
            if lock(&r.words).remove(&token).is_some() {
                // Let the thread drop its hold on the word's mapping now.
                r.poke();
            }
        }
    }
}

impl Reactor {
    fn poke(&self) {
        self.control.fetch_add(1, Ordering::SeqCst);
        super::futex::wake_all(&self.control);
    }

    fn run_futex(&'static self) {
        let mut waitv: Vec<FutexWaitv> = Vec::with_capacity(WAITV_MAX);
        let mut held: Vec<Arc<dyn FutexWord>> = Vec::with_capacity(WAITV_MAX);
        let mut waitv_works = true;
        loop {
            waitv.clear();
            held.clear();
            let mut deadline: Option<Instant> = None;
            {
                let words = lock(&self.words);
                waitv.push(FutexWaitv {
                    val: self.control.load(Ordering::SeqCst) as u64,
                    uaddr: self.control.as_ptr() as u64,
                    flags: FUTEX2_SIZE_U32,
                    reserved: 0,
                });
                for w in words.values() {
                    if let Some(d) = w.deadline {
                        deadline = Some(deadline.map_or(d, |x: Instant| x.min(d)));
                    }
                    if waitv.len() < WAITV_MAX && waitv_works {
                        waitv.push(FutexWaitv {
                            val: w.expected as u64,
                            uaddr: w.host.word().as_ptr() as u64,
                            flags: FUTEX2_SIZE_U32,
                            reserved: 0,
                        });
                        held.push(w.host.clone());
                    } else {
                        let tick = Instant::now() + FALLBACK_TICK;
                        deadline = Some(deadline.map_or(tick, |x: Instant| x.min(tick)));
                    }
                }
            }
            if waitv_works {
                let ts = deadline.map(|d| {
                    let left = d.saturating_duration_since(Instant::now());
                    let ns = super::process::monotonic_ns()
                        + left.as_nanos().min(u64::MAX as u128 / 2) as u64;
                    libc::timespec {
                        tv_sec: (ns / 1_000_000_000) as libc::time_t,
                        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
                    }
                });
                let tsp = ts
                    .as_ref()
                    .map_or(std::ptr::null(), |t| t as *const libc::timespec);
                // SAFETY: `waitv` is a valid array of `futex_waitv` of the given length.
                // Every address in it is a live word: the control word is in the reactor
                // (never freed), and each other word belongs to a host held in `held` for
                // the whole call, which keeps its mapping alive. The kernel only reads
                // them. The timeout is null or an absolute CLOCK_MONOTONIC time we own.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_futex_waitv,
                        waitv.as_ptr(),
                        waitv.len() as libc::c_uint,
                        0 as libc::c_uint,
                        tsp,
                        libc::CLOCK_MONOTONIC,
                    )
                };
                if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                    // An old kernel: look at every word every few milliseconds.
                    waitv_works = false;
                }
            } else {
                let d = deadline.unwrap_or_else(|| Instant::now() + FALLBACK_TICK);
                let c = waitv[0].val as u32;
                super::futex::wait(
                    &self.control,
                    c,
                    Some(d.min(Instant::now() + FALLBACK_TICK)),
                );
            }
            held.clear();
            let now = Instant::now();
            let woken: Vec<Waker> = {
                let mut words = lock(&self.words);
                let due: Vec<u64> = words
                    .iter()
                    .filter(|(_, w)| {
                        !waitv_works
                            || w.host.word().load(Ordering::SeqCst) != w.expected
                            || w.deadline.is_some_and(|d| d <= now)
                    })
                    .map(|(t, _)| *t)
                    .collect();
                due.iter()
                    .filter_map(|t| words.remove(t))
                    .map(|w| w.waker)
                    .collect()
            };
            woken.into_iter().for_each(Waker::wake);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::atomic::AtomicBool;
    use std::task::Wake;

    struct Flag(AtomicBool, std::thread::Thread);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
            self.1.unpark();
        }
    }

    fn wait_flag(f: &Flag) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        while !f.0.load(Ordering::SeqCst) && Instant::now() < end {
            std::thread::park_timeout(Duration::from_millis(50));
        }
        f.0.load(Ordering::SeqCst)
    }

    #[test]
    fn a_descriptor_wakes_its_task_once_ready() {
        let flag = Arc::new(Flag(AtomicBool::new(false), std::thread::current()));
        let waker = Waker::from(flag.clone());
        let ev = super::super::fd::eventfd().unwrap();
        let mut w = FdWatch::new();
        w.arm(ev.as_fd(), Ready::Read, &waker).unwrap();
        assert!(!flag.0.load(Ordering::SeqCst));
        super::super::fd::eventfd_signal(ev.as_fd());
        assert!(wait_flag(&flag));
    }

    struct Word(AtomicU32);
    impl FutexWord for Word {
        fn word(&self) -> &AtomicU32 {
            &self.0
        }
    }

    #[test]
    fn a_changed_word_wakes_its_task() {
        let flag = Arc::new(Flag(AtomicBool::new(false), std::thread::current()));
        let waker = Waker::from(flag.clone());
        let word = Arc::new(Word(AtomicU32::new(7)));
        let mut w = FutexWatch::new();
        w.arm(word.clone(), 7, None, &waker).unwrap();
        word.0.store(8, Ordering::SeqCst);
        super::super::futex::wake_all(&word.0);
        assert!(wait_flag(&flag));

        // A deadline wakes too.
        let flag = Arc::new(Flag(AtomicBool::new(false), std::thread::current()));
        let waker = Waker::from(flag.clone());
        w.arm(
            word.clone(),
            8,
            Some(Instant::now() + Duration::from_millis(20)),
            &waker,
        )
        .unwrap();
        assert!(wait_flag(&flag));
    }
}
