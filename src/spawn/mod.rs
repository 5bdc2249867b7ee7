//! The child's side: how a new child receives its boot message, checks that it runs its
//! parent's build, and runs its target; plus who this process is (`current_process`)
//! and which children it has started ([`children`]).
#![allow(unsafe_code)]

pub(crate) mod children;
pub(crate) mod target;

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::sys::per_process::PerProcess;
use crate::sys::{image, process as sysproc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use target::Report;

/// The environment variable that gives a spawned image its role (`name:fd:parent pid`,
/// read by `bootstrap`).
pub(crate) const ROLE_ENV: &str = "MULTIPROCESS_ROLE";
/// The role name of a child image that runs a target ([`child_main`]).
pub(crate) const CHILD_ROLE: &str = "child";
/// The descriptor number at which a spawned image finds its channel.
pub(crate) const CHANNEL_FD: RawFd = 3;
/// Exit code of a child whose parent vanished before it could start.
const EXIT_ORPHANED: i32 = 70;

/// What the parent sends first on a child's channel; the args follow in the next message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Boot {
    pub build_id: Vec<u8>,
    pub entry: i64,
    pub name: String,
    pub identity: Vec<u32>,
    pub daemon: bool,
    pub parent_pid: u32,
    pub parent_name: String,
    pub authkey: Vec<u8>,
}

/// Who this process is.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub name: String,
    pub identity: Vec<u32>,
    pub daemon: bool,
    pub parent: Option<(u32, String)>,
    pub authkey: Vec<u8>,
}

fn main_identity() -> Identity {
    let mut key = vec![0u8; 32];
    crate::sys::process::random_bytes(&mut key);
    Identity {
        name: "MainProcess".into(),
        identity: Vec::new(),
        daemon: false,
        parent: None,
        authkey: key,
    }
}

static CURRENT: PerProcess<Mutex<Identity>> =
    PerProcess::new(|| Mutex::new(inline_identity().unwrap_or_else(main_identity)));
static COUNTER: PerProcess<AtomicU32> = PerProcess::new(|| AtomicU32::new(0));

/// What a child records about itself as it starts, side by side so that it writes one
/// page for all of it (each page a new child writes is a copy-on-write fault). Aligned
/// so that it never straddles two pages.
#[repr(align(64))]
struct ChildRecord {
    /// This process's channel to its parent, if it is a child (closed in forked
    /// grandchildren).
    channel: AtomicI32,
    /// The boot message of a child that got it inline, kept undecoded until its identity
    /// is first asked for: the pid of that child (a process forked from it must not take
    /// the message for its own), where the bytes lie and how many there are. Written by
    /// [`child_main`] before the target runs. The bytes stay in place until the child
    /// exits: they lie in the frames of `child_main`'s callers, or in memory they own,
    /// and `child_main` never returns.
    boot_pid: AtomicU32,
    boot_ptr: AtomicPtr<u8>,
    boot_len: AtomicUsize,
}

static CHILD: ChildRecord = ChildRecord {
    channel: AtomicI32::new(-1),
    boot_pid: AtomicU32::new(0),
    boot_ptr: AtomicPtr::new(std::ptr::null_mut()),
    boot_len: AtomicUsize::new(0),
};

pub(crate) fn identity() -> Identity {
    CURRENT
        .get()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// The identity and default name for a new child of this process (`Process-N`, or
/// `Process-N:M` in a child), consuming a number as Python does at construction.
pub(crate) fn next_child_identity() -> (Vec<u32>, String) {
    let n = COUNTER.get().fetch_add(1, Ordering::Relaxed) + 1;
    let mut id = identity().identity;
    id.push(n);
    let name = format!(
        "Process-{}",
        id.iter().map(u32::to_string).collect::<Vec<_>>().join(":")
    );
    (id, name)
}

/// How a child came to be, for [`child_main`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Forked from its parent (the `fork` method): the parent's panic hook was prepared
    /// for it before the fork.
    Forked,
    /// A fresh image of the program (the `spawn` method).
    Fresh,
    /// Forked from the forkserver, a fresh image that already ignores `SIGPIPE` and has
    /// the panic recorder installed ([`prepare_forkserver`]): each child saves those
    /// steps (a system call and copy-on-write faults on the pages they write).
    Forkserver,
}

/// Done once in the forkserver, for every child it forks (see [`Origin::Forkserver`]).
pub(crate) fn prepare_forkserver() {
    sysproc::set_signal_ignored(libc::SIGPIPE, true);
    target::install_panic_recorder(true);
}

/// A boot message and its args as one byte string, for a child that finds them in its
/// memory instead of reading them from its channel (see `popen::launch`).
///
/// The entry and the build id come first, in a fixed layout, so that the child checks its
/// build and finds its target without running the decoder; the rest of the boot message
/// (who the child is) is decoded when it is first asked for ([`identity`]). A new child
/// touches that much less code and memory, each first touch being a page fault in a
/// forked child. Layout, little-endian: entry (8 bytes), build id length (2), build id,
/// boot message length (4), boot message, args.
pub(crate) fn inline(boot: &Boot, boot_bytes: &[u8], args: &[u8]) -> Vec<u8> {
    let id = &boot.build_id[..boot.build_id.len().min(u16::MAX as usize)];
    let mut v = Vec::with_capacity(14 + id.len() + boot_bytes.len() + args.len());
    v.extend_from_slice(&boot.entry.to_le_bytes());
    v.extend_from_slice(&(id.len() as u16).to_le_bytes());
    v.extend_from_slice(id);
    v.extend_from_slice(&(boot_bytes.len() as u32).to_le_bytes());
    v.extend_from_slice(boot_bytes);
    v.extend_from_slice(args);
    v
}

/// The parts of bytes made by [`inline`].
struct Inline<'a> {
    entry: i64,
    build_id: &'a [u8],
    boot: &'a [u8],
    args: &'a [u8],
}

/// Splits bytes made by [`inline`]; `None` if they are not (truncated, or lengths that
/// point past the end).
fn split_inline(bytes: &[u8]) -> Option<Inline<'_>> {
    let (entry, rest) = bytes.split_first_chunk::<8>()?;
    let (id_len, rest) = rest.split_first_chunk::<2>()?;
    let (build_id, rest) = rest.split_at_checked(usize::from(u16::from_le_bytes(*id_len)))?;
    let (boot_len, rest) = rest.split_first_chunk::<4>()?;
    let (boot, args) =
        rest.split_at_checked(usize::try_from(u32::from_le_bytes(*boot_len)).ok()?)?;
    Some(Inline {
        entry: i64::from_le_bytes(*entry),
        build_id,
        boot,
        args,
    })
}

/// Records this child's inline boot message (see [`ChildRecord::boot_pid`]).
fn keep_inline_boot(boot: &[u8]) {
    CHILD
        .boot_ptr
        .store(boot.as_ptr().cast_mut(), Ordering::Relaxed);
    CHILD.boot_len.store(boot.len(), Ordering::Relaxed);
    CHILD.boot_pid.store(sysproc::getpid(), Ordering::Release);
}

/// This process's identity as its inline boot message gives it, if it has one.
fn inline_identity() -> Option<Identity> {
    if CHILD.boot_pid.load(Ordering::Acquire) != sysproc::getpid() {
        return None;
    }
    let ptr = CHILD.boot_ptr.load(Ordering::Relaxed);
    let len = CHILD.boot_len.load(Ordering::Relaxed);
    // SAFETY: recorded by `keep_inline_boot` in this very process (the pid matches), from
    // a slice that stays valid and unchanged until the process exits (see
    // `ChildRecord::boot_pid`).
    let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
    match crate::reduction::decode::<Boot>(bytes, &mut Default::default()) {
        Ok(boot) => Some(boot.into()),
        Err(e) => {
            // What the child would have done had it decoded the message at its start.
            eprintln!("multiprocess: bad boot message from the parent: {e}");
            sysproc::exit_now(1)
        }
    }
}

impl From<Boot> for Identity {
    fn from(boot: Boot) -> Identity {
        Identity {
            name: boot.name,
            identity: boot.identity,
            daemon: boot.daemon,
            parent: Some((boot.parent_pid, boot.parent_name)),
            authkey: boot.authkey,
        }
    }
}

/// The life of every child, whatever its start method: tie its life to the parent's,
/// read the boot message (from `inline` if it came that way, from the channel
/// otherwise), run the target, report, clean up, exit.
pub(crate) fn child_main(
    channel: OwnedFd,
    expected_parent: u32,
    origin: Origin,
    inline: Option<&[u8]>,
) -> ! {
    // Die with the parent. The signal fires when our parent *thread* ends; children are
    // always started from the parent's long-lived supervisor thread, so this is when the
    // parent process ends. The check closes the race with a parent that died already.
    let _ = sysproc::set_parent_death_signal(libc::SIGKILL);
    if sysproc::getppid() != expected_parent {
        sysproc::exit_now(EXIT_ORPHANED);
    }
    // Behave like a Rust `main`: writing to a closed pipe is an error, not a signal.
    if origin != Origin::Forkserver {
        sysproc::set_signal_ignored(libc::SIGPIPE, true);
    }
    // A forked child must not keep its parent's channel (if the parent was a child too).
    let inherited = CHILD.channel.swap(channel.as_raw_fd(), Ordering::SeqCst);
    if inherited >= 0 && inherited != channel.as_raw_fd() {
        sysproc::close_raw(inherited);
    }
    let conn = Connection::from_fd(channel, true, true);
    let code = run_child(&conn, origin, inline);
    // Standard error is not buffered: only standard output needs flushing.
    let _ = std::io::stdout().flush();
    if children::exit_children() {
        let _ = std::io::stdout().flush();
    }
    sysproc::exit_now(code)
}

fn run_child(conn: &Connection, origin: Origin, inline: Option<&[u8]>) -> i32 {
    if let Some(bytes) = inline {
        let Some(inline) = split_inline(bytes) else {
            eprintln!("multiprocess: bad boot message from the parent: truncated");
            return 1;
        };
        keep_inline_boot(inline.boot);
        return run_target(
            conn,
            origin,
            inline.build_id,
            inline.entry,
            Some(inline.args),
        );
    }
    let mut boot: Boot = match conn.recv() {
        Ok(b) => b,
        // The parent went away before sending anything: nothing to run.
        Err(Error::Eof) => return EXIT_ORPHANED,
        Err(e) => {
            eprintln!("multiprocess: bad boot message from the parent: {e}");
            return 1;
        }
    };
    let (build_id, entry) = (std::mem::take(&mut boot.build_id), boot.entry);
    // Set, not assigned through `get`: that would first make a main-process identity
    // (random key and all) only to drop it.
    CURRENT.set(Mutex::new(boot.into()));
    run_target(conn, origin, &build_id, entry, None)
}

/// Checks the parent's build against ours, then runs the entry at `entry`, with `args`
/// if they came inline. Returns the exit code.
fn run_target(
    conn: &Connection,
    origin: Origin,
    build_id: &[u8],
    entry: i64,
    args: Option<&[u8]>,
) -> i32 {
    let ours = image::build_id();
    if !same_bytes(build_id, ours) {
        let (parent, child) = (image::hex(build_id), image::hex(ours));
        eprintln!("multiprocess: refusing to run: the parent runs build {parent}, this program is build {child}");
        let _ = conn.send(&Report::ImageMismatch { parent, child });
        return 1;
    }
    match origin {
        Origin::Forked => target::install_panic_recorder(false),
        Origin::Fresh => target::install_panic_recorder(true),
        Origin::Forkserver => {}
    }
    // SAFETY: the offset was computed by `process_entry`/`call_entry` in the parent, and
    // the build ids are equal, so it denotes the same entry function here.
    let entry = match unsafe { target::resolve::<target::EntryFn>(entry) } {
        Ok(entry) => entry,
        Err(e) => {
            let _ = conn.send(&Report::Failed(e.to_string()));
            return 1;
        }
    };
    entry(conn, args)
}

/// Whether two byte strings are equal, without `memcmp` (which a new child would fault
/// in for this one comparison: see `sys::process`).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A snapshot of the calling process, as Python's `current_process()` gives it.
#[derive(Clone)]
pub struct CurrentProcess {
    id: Identity,
    pid: u32,
}

impl CurrentProcess {
    /// The process's name: `MainProcess`, `Process-N`, or the name it was given.
    pub fn name(&self) -> &str {
        &self.id.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process was started as a daemon.
    pub fn daemon(&self) -> bool {
        self.id.daemon
    }

    /// The process's identity: `[]` for the main process, `[2]` for `Process-2`,
    /// `[2, 1]` for its first child.
    pub fn identity(&self) -> &[u32] {
        &self.id.identity
    }

    /// The process's authentication key: 32 random bytes made by the main process and
    /// inherited by its children (Python's `current_process().authkey`).
    pub fn authkey(&self) -> &[u8] {
        &self.id.authkey
    }

    /// The parent's pid, for a child started by this crate.
    pub fn parent_pid(&self) -> Option<u32> {
        self.id.parent.as_ref().map(|p| p.0)
    }
}

impl fmt::Debug for CurrentProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurrentProcess")
            .field("name", &self.id.name)
            .field("pid", &self.pid)
            .field("daemon", &self.id.daemon)
            .field("parent", &self.parent_pid())
            .finish()
    }
}

/// Like Python's repr: `<Process name='Process-1' parent=41 started daemon>`.
impl fmt::Display for CurrentProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parent_pid() {
            None => write!(
                f,
                "<_MainProcess name='{}' parent=None started>",
                self.id.name
            ),
            Some(ppid) => {
                write!(f, "<Process name='{}' parent={ppid} started", self.id.name)?;
                if self.id.daemon {
                    write!(f, " daemon")?;
                }
                write!(f, ">")
            }
        }
    }
}

/// The process that is calling (Python's `multiprocessing.current_process()`).
///
/// ```
/// let me = multiprocess::current_process();
/// assert_eq!(me.pid(), std::process::id());
/// assert_eq!(me.name(), "MainProcess");
/// ```
pub fn current_process() -> CurrentProcess {
    CurrentProcess {
        id: identity(),
        pid: sysproc::getpid(),
    }
}

/// The parent of a child started by this crate (Python's `parent_process()`); `None` in
/// the main process.
#[derive(Clone, Debug)]
pub struct ParentProcess {
    pid: u32,
    name: String,
}

impl ParentProcess {
    /// The parent's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The parent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the parent is still alive (we would have been re-parented otherwise).
    pub fn is_alive(&self) -> bool {
        sysproc::getppid() == self.pid
    }
}

/// The parent of this process, if it was started by this crate.
///
/// ```
/// assert!(multiprocess::parent_process().is_none()); // in the main process
/// ```
pub fn parent_process() -> Option<ParentProcess> {
    identity()
        .parent
        .map(|(pid, name)| ParentProcess { pid, name })
}

/// The boot message for a new child of this process.
pub(crate) fn boot_for(entry: i64, name: &str, identity_path: &[u32], daemon: bool) -> Boot {
    let me = identity();
    Boot {
        build_id: image::build_id().to_vec(),
        entry,
        name: name.to_string(),
        identity: identity_path.to_vec(),
        daemon,
        parent_pid: sysproc::getpid(),
        parent_name: me.name,
        authkey: me.authkey,
    }
}

/// Maps a child's failure report to an error.
pub(crate) fn report_error(report: Report) -> Result<()> {
    match report {
        Report::Returned => Ok(()),
        Report::Panicked { message, location } => Err(Error::Panicked { message, location }),
        Report::Failed(why) => Err(Error::Process(why)),
        Report::ImageMismatch { parent, child } => Err(Error::ImageMismatch { parent, child }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Boot, Vec<u8>) {
        let boot = boot_for(0x1234, "Process-7", &[7], true);
        let bytes = crate::reduction::encode(&boot).unwrap().bytes;
        (boot, bytes)
    }

    #[test]
    fn inline_bytes_split_back_into_their_parts() {
        let (boot, boot_bytes) = sample();
        let args = crate::reduction::encode(&(1u8, "two")).unwrap().bytes;
        let all = inline(&boot, &boot_bytes, &args);
        let parts = split_inline(&all).expect("well formed");
        assert_eq!(parts.entry, 0x1234);
        assert_eq!(parts.build_id, &boot.build_id[..]);
        assert_eq!(parts.boot, &boot_bytes[..]);
        assert_eq!(parts.args, &args[..]);
        let back: Boot = crate::reduction::decode(parts.boot, &mut Default::default()).unwrap();
        let id = Identity::from(back);
        assert_eq!(id.name, "Process-7");
        assert_eq!(id.identity, [7]);
        assert!(id.daemon);
        assert_eq!(id.authkey, boot.authkey);
    }

    #[test]
    fn cut_or_lying_inline_bytes_are_refused_without_panicking() {
        let (boot, boot_bytes) = sample();
        let all = inline(&boot, &boot_bytes, &[]);
        // Every cut inside the fixed parts and the boot message is noticed (a cut in the
        // args is the args decoder's to notice).
        for end in 0..all.len() {
            assert!(split_inline(&all[..end]).is_none(), "cut at {end}");
        }
        // Lengths that point past the end.
        let mut lying = all.clone();
        lying[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(split_inline(&lying).is_none());
        let mut lying = all;
        let at = 10 + boot.build_id.len();
        lying[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(split_inline(&lying).is_none());
    }
}
