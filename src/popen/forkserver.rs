//! The forkserver: one small server per process, started from a fresh image of this
//! program (before its `main`, single-threaded), that forks children on request.
//!
//! Children come from a clean image, so they are safe however many threads the user's
//! process has, and a fork of the small server costs far less than a new image. The
//! server forks with `CLONE_PARENT`, which makes each child a child of the *user's*
//! process: the user waits for it and reads its exit status directly, as with any other
//! start method.
//!
//! Like CPython's forkserver, children inherit the server's environment and working
//! directory as they were when the server started (on the first `Forkserver` start).
//!
//! A request is one `SOCK_SEQPACKET` message: the parent's pid, then (if they fit
//! [`INLINE_MAX`]) the child's boot message and args, with the child's channel attached.
//! The server receives it on its stack, forks, and replies with the child's pid (or a
//! negated `errno`); the child reads its boot message from its copy of the server's stack.
//! Neither side sleeps at once: the parent looks for the reply for up to 200 µs, and the
//! server, while requests come back to back, for the next request. On a virtual machine
//! a CPU that went idle takes 20–40 µs to run a woken thread.

use crate::error::{Error, Result};
use crate::sys::fd::readable_within;
use crate::sys::per_process::PerProcess;
use crate::sys::process::{self as sysproc, Forked};
use crate::sys::socket::{self, Kind};
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Server {
    sock: OwnedFd,
}

/// One server per executable (the default one is keyed by `None`).
static SERVERS: PerProcess<Mutex<HashMap<Option<PathBuf>, Server>>> =
    PerProcess::new(|| Mutex::new(HashMap::new()));

/// Asks the forkserver (started on first use, restarted if it died) for a child. The
/// request carries `inline` if it fits ([`INLINE_MAX`]); otherwise `meanwhile` runs (at
/// most once) while the server forks (see [`super::launch`]).
pub(crate) fn launch(
    channel: OwnedFd,
    executable: Option<&Path>,
    inline: Option<&[u8]>,
    meanwhile: &mut dyn FnMut(),
) -> Result<(u32, bool)> {
    let mut inline = inline.filter(|b| b.len() <= INLINE_MAX);
    let mut servers = SERVERS.get().lock().unwrap_or_else(|p| p.into_inner());
    let key = executable.map(Path::to_path_buf);
    let mut last = None;
    let mut meanwhile = Some(meanwhile);
    let mut once = || {
        if let Some(f) = meanwhile.take() {
            f();
        }
    };
    let mut restarts = 0;
    while restarts < 2 {
        if !servers.contains_key(&key) {
            let s = start(executable)?;
            servers.insert(key.clone(), s);
        }
        let s = &servers[&key];
        match request(s, &channel, inline, &mut once) {
            Ok(Ok(pid)) => return Ok((pid, inline.is_some())),
            // A server of another build (see `set_executable`) that takes plain requests
            // only: ask it plainly, and its child reads its boot message from the channel
            // (and reports the mismatch).
            Ok(Err(e)) if inline.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {
                inline = None;
            }
            // The server is fine; the fork itself failed (EAGAIN, ENOMEM...).
            Ok(Err(e)) => return Err(e.into()),
            // The server is gone (or never came up): start another one and try once
            // more, with lazy binding in case eager binding is what kept it from starting.
            Err(e) => {
                super::BIND_NOW.store(false, std::sync::atomic::Ordering::Relaxed);
                servers.remove(&key);
                last = Some(e);
                restarts += 1;
            }
        }
    }
    Err(Error::process(format!(
        "the forkserver failed: {}",
        last.expect("set on failure")
    )))
}

fn start(executable: Option<&Path>) -> Result<Server> {
    let (ours, theirs) = socket::socketpair(Kind::SeqPacket)?;
    let (spec, theirs) = super::image_spec(ROLE, theirs, executable)?;
    let sup = super::supervisor::get();
    let pid = sup.call(move || {
        let r = sysproc::spawn_image(&spec);
        drop(theirs);
        r
    })?;
    // Reap the server whenever it exits, so it never lingers as a zombie.
    let pidfd = sysproc::pidfd_open(pid)?;
    let watch = pidfd.try_clone()?;
    sup.watch(watch, move || {
        let _ = sysproc::waitid(pidfd.as_fd(), true, false);
    });
    Ok(Server { sock: ours })
}

/// How long a start looks for the server's reply before it sleeps: the reply comes as
/// soon as the server has forked, well within it.
const REPLY_SPIN: Duration = Duration::from_micros(200);
/// How long the server looks for the next request after a reply, when the request came
/// this soon after the previous reply (starts back to back).
const SERVE_SPIN: Duration = Duration::from_micros(200);

/// Outer error: the server is unreachable. Inner error: the server could not fork.
/// `meanwhile` runs once the request is on its way, while the server forks.
fn request(
    server: &Server,
    channel: &OwnedFd,
    inline: Option<&[u8]>,
    meanwhile: &mut dyn FnMut(),
) -> io::Result<io::Result<u32>> {
    let me = sysproc::getpid().to_le_bytes();
    socket::sendmsg(
        server.sock.as_fd(),
        &[IoSlice::new(&me), IoSlice::new(inline.unwrap_or_default())],
        &[channel.as_raw_fd()],
        false,
    )?;
    if inline.is_none() {
        meanwhile();
    }
    // The reply comes as soon as the server has forked, in well under REPLY_SPIN: look
    // for it without sleeping (yielding the CPU between looks), so that this thread goes
    // on at once instead of after a sleeping thread's wake-up (20-40 µs on a VM).
    readable_within(server.sock.as_fd(), REPLY_SPIN)?;
    let mut reply = [0u8; 8];
    let mut fds = Vec::new();
    let n = socket::recvmsg(server.sock.as_fd(), &mut reply, &mut fds, false)?;
    if n != reply.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the forkserver closed its socket",
        ));
    }
    let v = i64::from_le_bytes(reply);
    Ok(if v < 0 {
        Err(io::Error::from_raw_os_error((-v) as i32))
    } else {
        Ok(v as u32)
    })
}

/// The largest boot message and args (together) that a request carries.
pub(crate) const INLINE_MAX: usize = 16 << 10;
/// A request: the parent's pid, then the inline bytes if any.
const REQUEST_HEAD: usize = 4;

/// The role name of the forkserver image.
pub(crate) const ROLE: &str = "forkserver";

/// The server's loop (runs before `main` in the server image; never returns).
pub(crate) fn serve(sock: OwnedFd, parent: u32) -> ! {
    let _ = sysproc::set_parent_death_signal(libc::SIGKILL);
    if sysproc::getppid() != parent {
        sysproc::exit_now(0);
    }
    crate::spawn::prepare_forkserver();
    // Set by our parent for this image only (see `image_spec`); children must not see it.
    // This image is single-threaded, so changing the environment is sound.
    if std::env::var_os(super::BIND_NOW_MARK).is_some() {
        std::env::remove_var(super::BIND_NOW_ENV);
        std::env::remove_var(super::BIND_NOW_MARK);
    }
    warm_up();
    // One byte more than the largest request, to tell an oversized one (truncated by the
    // kernel) from one that fits. Zeroed once: the kernel writes only what it received,
    // so a small request writes one page of it.
    let mut buf = [0u8; REQUEST_HEAD + INLINE_MAX + 1];
    let mut replied: Option<Instant> = None;
    let mut burst = false;
    loop {
        // Nothing on the heap: after a fork every page this server writes is copied for
        // it (the child shares them until then), while the new child waits for this CPU.
        // A `malloc`/`free` per request would write three such pages (the heap, the
        // allocator's thread cache and its arena); the stack is one, written anyway.
        let mut channel = None;
        let mut extra = false;
        let mut on_fd = |fd| match channel {
            None => channel = Some(fd),
            // Closed as it drops.
            Some(_) => extra = true,
        };
        // While starts come back to back (a loop of them, a pool starting its workers),
        // look for the next request before sleeping: on a virtual machine a CPU that went
        // idle takes 20-40 µs to run a woken server again. One request alone (the
        // previous reply long ago) spins for nothing.
        if burst {
            let _ = readable_within(sock.as_fd(), SERVE_SPIN);
        }
        let n = match socket::recvmsg_with(sock.as_fd(), &mut buf, &mut on_fd, false) {
            Ok(0) | Err(_) => sysproc::exit_now(0),
            Ok(n) => n,
        };
        burst = replied.is_some_and(|t| t.elapsed() < SERVE_SPIN);
        let reply: i64 = match channel.take() {
            Some(channel) if (REQUEST_HEAD..buf.len()).contains(&n) && !extra => {
                // SAFETY: this server is single-threaded: it runs before `main` in its own
                // image and starts no threads.
                match unsafe { sysproc::fork_sibling() } {
                    Ok(Forked::Child) => {
                        sysproc::close_raw(sock.into_raw_fd());
                        // The child reads its boot message from its copy of `buf`, which
                        // stays in place: `child_main` never returns.
                        let inline = &buf[REQUEST_HEAD..n];
                        crate::spawn::child_main(
                            channel,
                            parent,
                            crate::spawn::Origin::Forkserver,
                            (!inline.is_empty()).then_some(inline),
                        )
                    }
                    Ok(Forked::Parent(pid)) => pid as i64,
                    Err(e) => -(e.raw_os_error().unwrap_or(libc::EIO) as i64),
                }
            }
            _ => -(libc::EINVAL as i64),
        };
        if socket::sendmsg(
            sock.as_fd(),
            &[IoSlice::new(&reply.to_le_bytes())],
            &[],
            false,
        )
        .is_err()
        {
            sysproc::exit_now(0);
        }
        replied = Some(Instant::now());
    }
}

/// Does once, in the server, the first things every child does, so that children inherit
/// them done instead of each paying for them in page faults: stdio initialised, and this
/// thread's thread-locals (which children inherit, being copies of it) registered.
fn warm_up() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    crate::reduction::touch_thread_locals();
}
