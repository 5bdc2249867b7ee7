//! File-descriptor helpers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Turns a `-1` return into the last OS error.
pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Like [`cvt`] for `ssize_t` results.
pub(crate) fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Duplicates `fd` to a new close-on-exec descriptor numbered at least `min`.
pub(crate) fn dup_cloexec(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a fresh descriptor that we then own exclusively.
    unsafe {
        let new = cvt(libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min))?;
        Ok(OwnedFd::from_raw_fd(new))
    }
}

/// Adopts a descriptor number inherited from the parent (spawned children only).
///
/// # Safety
/// `fd` must be an open descriptor that nothing else in this process owns.
pub(crate) unsafe fn adopt(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the caller guarantees the descriptor is open and unowned; F_GETFD checks
    // that it is open at all before we wrap it.
    unsafe {
        cvt(libc::fcntl(fd, libc::F_GETFD))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// What `poll` saw on one descriptor.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ready {
    pub readable: bool,
}

/// Waits until one of `fds` is readable (or hung up), or the timeout passes.
/// Returns one entry per descriptor; all false on timeout. Retries on `EINTR`.
pub(crate) fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> io::Result<Vec<Ready>> {
    let mut pfds = pollfds(fds);
    poll_in(&mut pfds, timeout)?;
    Ok(readiness(&pfds))
}

/// [`poll_readable`] that first looks for up to `spin` (never past `timeout`) without
/// sleeping, yielding the CPU between looks, then sleeps for the rest of the timeout.
/// For waits that often end within microseconds: waking a sleeping thread costs 20–40 µs
/// on a virtual machine whose other CPU idles, and the yields let whatever this CPU is
/// needed for run first.
pub(crate) fn poll_readable_spinning(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
    spin: Duration,
) -> io::Result<Vec<Ready>> {
    let began = Instant::now();
    let spin = timeout.map_or(spin, |t| t.min(spin));
    let mut pfds = pollfds(fds);
    if !spin.is_zero() && spin_in(&mut pfds, began, spin)? {
        return Ok(readiness(&pfds));
    }
    poll_in(
        &mut pfds,
        timeout.map(|t| t.saturating_sub(began.elapsed())),
    )?;
    Ok(readiness(&pfds))
}

fn pollfds(fds: &[BorrowedFd<'_>]) -> Vec<libc::pollfd> {
    fds.iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect()
}

fn readiness(pfds: &[libc::pollfd]) -> Vec<Ready> {
    pfds.iter()
        .map(|p| Ready {
            readable: p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
        })
        .collect()
}

/// Looks for up to `spin` whether `fd` is readable (or hung up), without sleeping: polls,
/// yielding the CPU between looks. Allocates nothing, so that a forkserver may call it
/// between forks (see `popen::forkserver`). The caller sleeps in its read if this says no.
pub(crate) fn readable_within(fd: BorrowedFd<'_>, spin: Duration) -> io::Result<bool> {
    let mut pfd = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    spin_in(&mut pfd, Instant::now(), spin)
}

/// The look of [`poll_readable_spinning`] and [`readable_within`]: polls `pfds` without
/// sleeping, yielding the CPU between looks, until one is ready (true) or `spin` has
/// passed since `began` (false).
fn spin_in(pfds: &mut [libc::pollfd], began: Instant, spin: Duration) -> io::Result<bool> {
    loop {
        if poll_in(pfds, Some(Duration::ZERO))? {
            return Ok(true);
        }
        if began.elapsed() >= spin {
            return Ok(false);
        }
        std::thread::yield_now();
    }
}

/// One wait of `poll` over `pfds` (their `revents` filled in); true if any is ready.
fn poll_in(pfds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms: libc::c_int = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so that a short timeout never degenerates into a busy loop.
                let ms = left.as_micros().div_ceil(1000);
                ms.min(libc::c_int::MAX as u128) as libc::c_int
            }
        };
        // SAFETY: pfds is a valid, exclusively borrowed array of pollfd of the given length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            if let Some(d) = deadline {
                if Instant::now() < d {
                    continue;
                }
            }
        }
        return Ok(r > 0);
    }
}

/// Creates an eventfd used to wake a thread blocked in `poll`.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a fresh descriptor that we own.
    unsafe {
        let fd = cvt(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Adds one to an eventfd (wakes its poller).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to a descriptor we borrow. A full counter
    // (EAGAIN) still leaves the fd readable, which is all we need.
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

/// Resets an eventfd's counter.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64; EAGAIN on an empty counter is fine.
    unsafe {
        libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8);
    }
}
