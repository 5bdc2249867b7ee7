//! Process creation, signals and waiting: fork, `CLONE_PARENT`, `posix_spawn`, pidfds.

use super::fd::cvt;
use super::status::ExitStatus;
use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

const P_PIDFD: libc::idtype_t = 3;

/// The result of a fork-like call, seen from each side.
pub(crate) enum Forked {
    /// We are the parent; the child's pid.
    Parent(u32),
    /// We are the new child.
    Child,
}

/// Plain `fork(2)` through glibc, so that `pthread_atfork` handlers run.
///
/// # Safety
/// In the child only async-signal-safe work is guaranteed to be sound if other threads
/// existed in the parent; the caller must arrange that (see the `Fork` start method docs).
pub(crate) unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: forwarded to the caller.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as u32)),
    }
}

/// Forks a child whose parent is *our* parent (`CLONE_PARENT`): used by the forkserver so
/// that the children it makes are children of the user's process, which can then wait for
/// them and read their exit status directly.
///
/// # Safety
/// Only call from a single-threaded process (the forkserver): the raw syscall bypasses
/// glibc's fork bookkeeping, which is only harmless when no other thread exists.
pub(crate) unsafe fn fork_sibling() -> io::Result<Forked> {
    // SAFETY: with a null stack pointer clone behaves like fork (the child continues on a
    // copy of this stack). The exit signal is inherited from us (SIGCHLD, as we were
    // started by posix_spawn). The caller guarantees we are single-threaded.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as u32)),
    }
}

/// Ends the process at once: no destructors, no atexit handlers, no stdio flush.
#[inline]
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: exit_group ends the process at once and does not return (through `syscall`:
    // see below).
    unsafe { libc::syscall(libc::SYS_exit_group, code as libc::c_long) };
    // SAFETY: not reached; _exit is always safe to call and does not return.
    unsafe { libc::_exit(code) }
}

// `getpid`, `getppid`, `prctl`, `close` and `exit_group` go through libc's generic
// `syscall` entry rather than their own wrappers: a new child of the forkserver runs
// them all, and its fork returned through `syscall`, so that code page is mapped in the
// child already; each wrapper sits on another page of libc, which the child (whose page
// tables for code start empty: fork does not copy them) would fault in, about 2 µs each
// on a virtual machine, to run a handful of instructions.

/// Our pid.
pub(crate) fn getpid() -> u32 {
    // SAFETY: getpid takes no arguments, cannot fail and has no memory effects.
    unsafe { libc::syscall(libc::SYS_getpid) as u32 }
}

/// Our parent's pid.
pub(crate) fn getppid() -> u32 {
    // SAFETY: getppid takes no arguments, cannot fail and has no memory effects.
    unsafe { libc::syscall(libc::SYS_getppid) as u32 }
}

/// Asks the kernel to send us `sig` when our parent thread dies.
pub(crate) fn set_parent_death_signal(sig: i32) -> io::Result<()> {
    let (option, sig) = (libc::PR_SET_PDEATHSIG as libc::c_long, sig as libc::c_long);
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    let r = unsafe { libc::syscall(libc::SYS_prctl, option, sig, 0 as libc::c_long) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets a signal's disposition to ignore or default.
pub(crate) fn set_signal_ignored(sig: i32, ignored: bool) {
    let handler = if ignored {
        libc::SIG_IGN
    } else {
        libc::SIG_DFL
    };
    // SAFETY: installing SIG_IGN/SIG_DFL involves no handler code of ours.
    unsafe {
        libc::signal(sig, handler);
    }
}

/// Opens a pidfd for `pid` (close-on-exec).
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; on success it returns a new fd we own.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd as RawFd))
    }
}

/// Sends a signal through a pidfd (immune to pid reuse). Sending to a process that has
/// already exited (a zombie) is not an error.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: no pointers besides a null siginfo, which the call allows.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Sends a signal to a pid.
pub(crate) fn kill(pid: u32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    unsafe { cvt(libc::kill(pid as libc::pid_t, sig)).map(drop) }
}

/// `waitid` on a pidfd. With `nohang`, returns `None` while the child runs. With
/// `nowait`, leaves the child waitable (does not reap it).
pub(crate) fn waitid(
    pidfd: BorrowedFd<'_>,
    nohang: bool,
    nowait: bool,
) -> io::Result<Option<ExitStatus>> {
    let mut flags = libc::WEXITED;
    if nohang {
        flags |= libc::WNOHANG;
    }
    if nowait {
        flags |= libc::WNOWAIT;
    }
    loop {
        // SAFETY: siginfo_t is plain data; zeroed is valid and lets us detect "no child
        // changed state" (si_pid stays 0) under WNOHANG.
        let mut info: libc::siginfo_t = unsafe { mem::zeroed() };
        // SAFETY: info is a valid, writable siginfo_t.
        let r = unsafe { libc::waitid(P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: after a successful waitid the pid/status union members are initialised
        // (or all zero under WNOHANG when nothing changed).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(match info.si_code {
            libc::CLD_EXITED => ExitStatus::Exited(status),
            _ => ExitStatus::Signaled(status),
        }));
    }
}

/// What `spawn_image` needs.
pub(crate) struct SpawnSpec {
    /// The executable to run.
    pub path: CString,
    /// argv, argv[0] first.
    pub argv: Vec<CString>,
    /// The complete environment, `KEY=VALUE`.
    pub env: Vec<CString>,
    /// Descriptors to place at fixed numbers in the child: (source, target number).
    pub fds: Vec<(RawFd, RawFd)>,
}

extern "C" {
    // glibc 2.34+. Not in the libc crate for every target, so declared here.
    fn posix_spawn_file_actions_addclosefrom_np(
        actions: *mut libc::posix_spawn_file_actions_t,
        from: libc::c_int,
    ) -> libc::c_int;
}

/// Starts a new program image with `posix_spawn` (vfork-fast). The child gets descriptors
/// 0–2, the mapped `fds`, and nothing else.
pub(crate) fn spawn_image(spec: &SpawnSpec) -> io::Result<u32> {
    let mut argv: Vec<*mut libc::c_char> = spec.argv.iter().map(|s| s.as_ptr() as *mut _).collect();
    argv.push(ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = spec.env.iter().map(|s| s.as_ptr() as *mut _).collect();
    envp.push(ptr::null_mut());
    let highest = spec.fds.iter().map(|&(_, t)| t).max().unwrap_or(2);
    // SAFETY: the file actions object is initialised before use and destroyed on every
    // path; argv/envp are NULL-terminated arrays of pointers into CStrings that outlive
    // the call; posix_spawn writes the pid into a valid pid_t.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = mem::zeroed();
        let r = libc::posix_spawn_file_actions_init(&mut actions);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        let mut result = Ok(());
        for &(src, dst) in &spec.fds {
            // Every source is close-on-exec and different from its target, so dup2
            // gives the target a copy without FD_CLOEXEC.
            let r = libc::posix_spawn_file_actions_adddup2(&mut actions, src, dst);
            if r != 0 {
                result = Err(io::Error::from_raw_os_error(r));
            }
        }
        if result.is_ok() {
            let r = posix_spawn_file_actions_addclosefrom_np(&mut actions, highest + 1);
            if r != 0 {
                result = Err(io::Error::from_raw_os_error(r));
            }
        }
        let mut pid: libc::pid_t = 0;
        if result.is_ok() {
            let r = libc::posix_spawn(
                &mut pid,
                spec.path.as_ptr(),
                &actions,
                ptr::null(),
                argv.as_ptr(),
                envp.as_ptr(),
            );
            if r != 0 {
                result = Err(io::Error::from_raw_os_error(r));
            }
        }
        libc::posix_spawn_file_actions_destroy(&mut actions);
        result.map(|()| pid as u32)
    }
}

/// Fills `buf` from the kernel's CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most the remaining length into our own buffer.
        let r =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if r > 0 {
            filled += r as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", io::Error::last_os_error());
        }
    }
}

/// Whether this image runs in secure-execution mode (set-uid, set-gid, capabilities).
pub(crate) fn is_secure_exec() -> bool {
    // SAFETY: getauxval only reads the auxiliary vector.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// The program's file name as the kernel keeps a thread name (15 bytes and a NUL), read
/// once. Call it before a `fork` so that the child does not allocate.
pub(crate) fn program_name() -> Option<&'static std::ffi::CStr> {
    static NAME: std::sync::OnceLock<Option<std::ffi::CString>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        use std::os::unix::ffi::OsStrExt;
        let exe = std::fs::read_link("/proc/self/exe").ok()?;
        let name = exe.file_name()?.as_bytes();
        std::ffi::CString::new(&name[..name.len().min(15)]).ok()
    })
    .as_deref()
}

/// Names this thread (the main thread of a new child) after the program's file, which is
/// what `ps` and `top` show, instead of `exe` (the name a re-exec of `/proc/self/exe`
/// gets) or the name of the thread that forked it. Only a hint: failures are ignored.
pub(crate) fn name_after_program() {
    let Some(name) = program_name() else {
        return;
    };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from a
    // pointer that stays valid for the call.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    }
}

/// Writes all of `bytes` to `fd`, through `syscall` as above (a new child's report to
/// its parent, its last write).
pub(crate) fn write_all_plain(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        let rest = &bytes[done..];
        // SAFETY: write reads `rest.len()` bytes from `rest`, which is live for the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_write,
                fd.as_raw_fd() as libc::c_long,
                rest.as_ptr(),
                rest.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

/// Closes a descriptor number that no Rust object owns (one inherited across fork).
pub(crate) fn close_raw(fd: RawFd) {
    // SAFETY: the caller names a descriptor that nothing in this process owns any more.
    unsafe {
        libc::syscall(libc::SYS_close, fd as libc::c_long);
    }
}

/// Registers a function to run at normal process exit (`atexit`).
pub(crate) fn at_exit(f: extern "C" fn()) {
    // SAFETY: `f` is a plain function that stays valid for the life of the program.
    unsafe {
        libc::atexit(f);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own; CLOCK_MONOTONIC always exists.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Closes every descriptor from 3 up except `keep` (a forked child's fresh start).
pub(crate) fn close_fds_except(keep: RawFd) {
    let close_range = |lo: u32, hi: u32| {
        if lo <= hi {
            // SAFETY: close_range only closes descriptors; the caller owns every one of
            // them in this (new, single-threaded) child except `keep`, which is skipped.
            unsafe {
                libc::syscall(libc::SYS_close_range, lo, hi, 0u32);
            }
        }
    };
    let keep = keep.max(0) as u32;
    if keep >= 3 {
        close_range(3, keep - 1);
    }
    close_range(keep.max(2) + 1, u32::MAX);
}

/// The resident memory of a process, in bytes (`/proc/PID/statm`).
pub(crate) fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

/// Asks the C allocator to keep freed memory for reuse: blocks up to 32 MiB come from the
/// heap instead of fresh `mmap`s, and up to 64 MiB of free heap is kept instead of being
/// returned to the system. A pool worker allocates and frees buffers of the same few sizes
/// for every chunk; without this each one costs a page fault per 4 KiB, which on a virtual
/// machine was more than half of the time of a `map` of tiny tasks. Only called in the
/// crate's own worker processes, never in the user's.
pub(crate) fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
