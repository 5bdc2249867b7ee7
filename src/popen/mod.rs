//! Starting a child, one way per start method (Python's `popen_*` modules).
//!
//! Every method hands the child one end of a socket pair (its channel to the parent) and
//! returns the child's pid. The boot message and the args reach the child in its memory
//! where the method allows it (`fork`, the forkserver: see [`launch`]), on the channel
//! otherwise. The child's parent is always this process, so it can be waited for and its
//! exit status read.
#![allow(unsafe_code)]

pub(crate) mod forkserver;
pub(crate) mod supervisor;

pub(crate) use forkserver::INLINE_MAX;

use crate::context::StartMethod;
use crate::error::Result;
use crate::spawn::{CHANNEL_FD, CHILD_ROLE, ROLE_ENV};
use crate::sys::fd::dup_cloexec;
use crate::sys::process::{self as sysproc, Forked, SpawnSpec};
use std::ffi::{CString, OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// The dynamic linker's switch for binding every symbol at startup.
pub(crate) const BIND_NOW_ENV: &str = "LD_BIND_NOW";
/// Set beside [`BIND_NOW_ENV`] when this crate (not the user) set it for a forkserver.
pub(crate) const BIND_NOW_MARK: &str = "MULTIPROCESS_BIND_NOW";
/// Whether forkservers start with eager binding. Cleared if one failed to start with it
/// (a program whose libraries leave symbols unresolved runs only with lazy binding).
pub(crate) static BIND_NOW: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);

/// Starts a child with `method`; `channel` is the child's end of its channel. Returns
/// the child's pid, and whether the child got `inline`.
///
/// `inline` is the child's boot message and args ([`crate::spawn::inline`]), if they are
/// small and carry no descriptor. Where the method allows it, the child finds them in its
/// memory (a forked copy of the bytes), so that it reads nothing from its channel before
/// it runs its target. Otherwise `meanwhile` runs, at most once: while the child is being
/// made if the method allows it (the forkserver forks while this thread runs it), before
/// that otherwise; not at all if the forkserver cannot be reached. The caller writes the
/// boot message there, so that it is waiting when the child reads it.
pub(crate) fn launch(
    method: StartMethod,
    channel: OwnedFd,
    executable: Option<&Path>,
    inline: Option<&[u8]>,
    meanwhile: &mut dyn FnMut(),
) -> Result<(u32, bool)> {
    match method {
        StartMethod::Fork => {
            if inline.is_none() {
                meanwhile();
            }
            let inlined = inline.is_some();
            fork_child(channel, inline.map(<[u8]>::to_vec)).map(|pid| (pid, inlined))
        }
        StartMethod::Spawn => {
            meanwhile();
            spawn_child(channel, executable).map(|pid| (pid, false))
        }
        StartMethod::Forkserver => forkserver::launch(channel, executable, inline, meanwhile),
    }
}

fn fork_child(channel: OwnedFd, inline: Option<Vec<u8>>) -> Result<u32> {
    let parent = sysproc::getpid();
    crate::spawn::target::prepare_fork_panic_hook();
    supervisor::get().call(move || {
        // Flush buffered output so the child does not print it a second time, and hold
        // the stdio locks across the fork so that the child never inherits them locked
        // by another thread.
        let mut out = std::io::stdout().lock();
        let mut err = std::io::stderr().lock();
        let _ = out.flush();
        let _ = err.flush();
        // Read before the fork: the child must not allocate for it.
        let _ = sysproc::program_name();
        // Registered once in this thread, so that each child does not register them
        // anew (an allocation and the dynamic linker's lookup, all page faults in a
        // forked child).
        crate::reduction::touch_thread_locals();
        // SAFETY: the child only runs `child_main`; the locks it could most easily
        // inherit held (stdio) are held by this thread across the fork. Other threads'
        // locks are the documented hazard of the Fork start method.
        match unsafe { sysproc::fork() } {
            Ok(Forked::Child) => {
                drop(out);
                drop(err);
                // Like the other start methods, the child starts with descriptors 0-2
                // and its channel only; everything else travels in its args. Otherwise it
                // would hold ends of pipes belonging to other children of the parent,
                // whose peers would then never see end-of-file.
                sysproc::close_fds_except(channel.as_raw_fd());
                // A forked child has the name of the thread that forked it (the pool's
                // dispatcher, say): `ps` and `top` should show the program's.
                sysproc::name_after_program();
                crate::spawn::child_main(
                    channel,
                    parent,
                    crate::spawn::Origin::Forked,
                    inline.as_deref(),
                )
            }
            Ok(Forked::Parent(pid)) => Ok(pid),
            Err(e) => Err(e.into()),
        }
    })
}

fn spawn_child(channel: OwnedFd, executable: Option<&Path>) -> Result<u32> {
    let (spec, channel) = image_spec(CHILD_ROLE, channel, executable)?;
    supervisor::get().call(move || {
        let r = sysproc::spawn_image(&spec);
        drop(channel);
        r.map_err(Into::into)
    })
}

/// The spawn specification for a new image of this program in `role`, with `channel`
/// at [`CHANNEL_FD`]. Returns the channel too (possibly moved to another number), which
/// must stay open until the image is started.
pub(crate) fn image_spec(
    role: &str,
    channel: OwnedFd,
    executable: Option<&Path>,
) -> Result<(SpawnSpec, OwnedFd)> {
    // dup2 onto the same number would keep close-on-exec set: move it out of the way.
    let channel = if channel.as_raw_fd() == CHANNEL_FD {
        dup_cloexec(channel.as_fd(), 10)?
    } else {
        channel
    };
    let path = match executable {
        Some(p) => p.as_os_str().to_owned(),
        None => OsString::from("/proc/self/exe"),
    };
    let argv0 = std::env::args_os().next().unwrap_or_else(|| path.clone());
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k.as_os_str() != OsStr::new(ROLE_ENV))
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(cstring(
        format!("{ROLE_ENV}={role}:{CHANNEL_FD}:{}", sysproc::getpid()).into_bytes(),
    )?);
    if role == forkserver::ROLE
        && std::env::var_os(BIND_NOW_ENV).is_none()
        && BIND_NOW.load(std::sync::atomic::Ordering::Relaxed)
    {
        // The server resolves every dynamic symbol once, at its start, so that the
        // children it forks do not each resolve them again lazily (each lazy lookup
        // touches symbol-table pages that a fork child must fault in anew). The server
        // removes the variables before it forks anyone.
        env.push(cstring(format!("{BIND_NOW_ENV}=1").into_bytes())?);
        env.push(cstring(format!("{BIND_NOW_MARK}=1").into_bytes())?);
    }
    let spec = SpawnSpec {
        path: cstring(path.into_vec())?,
        argv: vec![cstring(argv0.into_vec())?],
        env,
        fds: vec![(channel.as_raw_fd(), CHANNEL_FD)],
    };
    Ok((spec, channel))
}

fn cstring(bytes: Vec<u8>) -> Result<CString> {
    CString::new(bytes)
        .map_err(|e| crate::Error::process(format!("a path or argument contains a NUL byte: {e}")))
}
