//! Named shared memory that unrelated processes can attach to (Python's
//! `multiprocessing.shared_memory`).
//!
//! A [`SharedMemory`] is a POSIX shared-memory object (a file under `/dev/shm`), so any
//! process that knows its name can map it, including CPython's
//! `multiprocessing.shared_memory.SharedMemory(name=...)`.
//!
//! # Who removes a segment (the ownership rule)
//!
//! * A segment made with [`SharedMemory::create`] belongs to the **process tree** it was
//!   made in: the main program (the process that was not started by this crate) and
//!   every process this crate started under it. When that main program ends, however it
//!   ends (normal exit, panic, `SIGKILL`), its children end with it, and the segments
//!   the tree created are removed. So a child may create a segment, pass its name back
//!   and exit, and the parent attaches to it afterwards, as with CPython.
//! * Processes that **attach** ([`SharedMemory::attach`], or receive a handle in
//!   [`Process`](crate::Process) args) never remove anything when they end, and a tree
//!   never removes segments it did not create. (CPython's resource tracker removes
//!   segments that other programs still use when an attaching program exits: cpython
//!   gh-82300. This rule cannot do that.)
//! * [`unlink`](SharedMemory::unlink) removes the name at once, from any process.
//!   [`persist`](SharedMemory::persist) takes the segment out of the tree's care: it then
//!   outlives the tree until someone unlinks it (or the machine reboots).
//!   [`adopt`](SharedMemory::adopt) attaches and puts a segment into the care of this
//!   process's tree.
//! * Removing the name never pulls memory away from a process that has it mapped: as
//!   with any file, the memory is freed when the last mapping goes.
//!
//! How: the first `create` in a process starts a small watcher process that makes the
//! segments for it, and watches both its creator (through a socket only the creator
//! holds) and the tree's main program (through a pidfd). It removes the segments once
//! the main program has ended (or at once, if the creator ends owning none). Only
//! `SIGKILL` of the watcher itself (it ignores the terminal's and `kill`'s default
//! signals) can leave a segment behind. The tree is found through
//! [`CurrentProcess::identity`](crate::CurrentProcess::identity): a process started with
//! another executable ([`Context::set_executable`](crate::Context::set_executable)) is
//! part of its parent's tree all the same.
//!
//! ```
//! use multiprocess::{Process, SharedMemory};
//!
//! fn fill(name: String) {
//!     let mut shm = SharedMemory::attach(&name).unwrap();
//!     shm.as_mut_slice()[..5].copy_from_slice(b"hello");
//! }
//!
//! let shm = SharedMemory::create(None, 4096)?;
//! let p = Process::new(fill, shm.name().to_string());
//! p.start()?;
//! p.join()?;
//! assert_eq!(&shm.as_slice()[..5], b"hello");
//! # Ok::<(), multiprocess::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::sys::fd::poll_readable;
use crate::sys::per_process::PerProcess;
use crate::sys::process as sysproc;
use crate::sys::shm::Mapping;
use crate::sys::shm_named;
use crate::sys::socket::{self, Kind};
use bytemuck::Pod;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

/// The longest name accepted (the tmpfs limit is 255 bytes).
const MAX_NAME: usize = 250;

/// A named shared-memory segment (Python's `SharedMemory`). See the
/// [module docs](self) for who removes it.
pub struct SharedMemory {
    name: String,
    map: Mapping,
}

impl SharedMemory {
    /// Creates a new segment of `size` bytes (zero-filled) named `name`, or a fresh random
    /// name if `None`. This process tree owns it: the name is removed when the tree's main
    /// program ends, unless [`persist`](Self::persist) is called (see the
    /// [module docs](self)). A name may be given with or without
    /// the leading `/` that `shm_open` uses.
    ///
    /// Errors: [`Error::InvalidArgument`] for a size of zero or a bad name, an
    /// [`Error::Io`] of kind `AlreadyExists` if the name is taken.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a size of zero or a bad name; an [`Error::Io`] of kind `AlreadyExists` if the name is taken, or another [`Error::Io`] from the system.
    #[doc(alias = "SharedMemory(create=True)")]
    pub fn create(name: Option<&str>, size: usize) -> Result<SharedMemory> {
        if size == 0 {
            return Err(Error::InvalidArgument(
                "a shared memory segment needs a size above zero".into(),
            ));
        }
        let size = u64::try_from(size)
            .ok()
            .filter(|&s| s <= isize::MAX as u64)
            .ok_or_else(|| Error::InvalidArgument(format!("size {size} is too large")))?;
        let name = match name {
            Some(n) => check_name(n)?.to_string(),
            None => random_name(),
        };
        let fd = watcher_call(Op::Create, &name, size)?.ok_or_else(|| {
            Error::process("the shared memory watcher answered without a descriptor")
        })?;
        let map = Mapping::map(fd)?;
        Ok(SharedMemory { name, map })
    }

    /// Attaches to the existing segment `name`. Attaching never makes this process an
    /// owner. An [`Error::Io`] of kind `NotFound` if there is no such segment;
    /// [`Error::InvalidArgument`] for a bad name or an empty segment.
    ///
    /// # Errors
    /// An [`Error::Io`] of kind `NotFound` if there is no such segment; [`Error::InvalidArgument`] for a bad name or an empty segment.
    #[doc(alias = "SharedMemory(name)")]
    pub fn attach(name: &str) -> Result<SharedMemory> {
        let name = check_name(name)?;
        let fd = shm_named::open(name).map_err(|e| named_error(e, name))?;
        Self::from_fd(name, fd)
    }

    /// Attaches to `name` and puts it in the care of this process tree: the end of the
    /// tree's main program now removes it. Meant for a segment that was
    /// [`persist`](Self::persist)ed or made by another program.
    ///
    /// # Errors
    /// As [`attach`](Self::attach).
    pub fn adopt(name: &str) -> Result<SharedMemory> {
        let name = check_name(name)?;
        let fd = watcher_call(Op::Adopt, name, 0)?
            .ok_or_else(|| Error::process("the shared memory watcher answered no descriptor"))?;
        Self::from_fd(name, fd)
    }

    fn from_fd(name: &str, fd: OwnedFd) -> Result<SharedMemory> {
        let map = Mapping::map(fd).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => {
                Error::InvalidArgument(format!("shared memory segment {name:?} is empty"))
            }
            _ => Error::Io(e),
        })?;
        Ok(SharedMemory {
            name: name.to_string(),
            map,
        })
    }

    /// The name, without a leading `/` (as CPython's `SharedMemory.name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The size in bytes.
    pub fn size(&self) -> usize {
        self.map.len()
    }

    /// The bytes. Other processes may change them at any time: read what you need under
    /// some synchronization of your own (a [`Lock`](crate::Lock), an
    /// [`Event`](crate::Event)), as with any memory shared between processes.
    #[doc(alias = "buf")]
    pub fn as_slice(&self) -> &[u8] {
        self.map.bytes()
    }

    /// The bytes, writable (see [`as_slice`](Self::as_slice)).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.bytes_mut()
    }

    /// The first `len` elements of type `T` laid over the bytes (the segment is
    /// page-aligned, so any `T` alignment up to 4096 fits). [`Error::InvalidArgument`] if
    /// the segment is too small for them.
    ///
    /// ```
    /// use multiprocess::{Error, SharedMemory};
    ///
    /// let mut shm = SharedMemory::create(None, 64)?;
    /// shm.as_mut_slice_of::<u64>(8)?[7] = 42;
    /// assert_eq!(shm.as_slice_of::<u64>(8)?[7], 42);
    /// assert!(matches!(shm.as_slice_of::<u64>(9), Err(Error::InvalidArgument(_))));
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `len` elements of `T` do not fit in the segment or its start is not aligned for `T`.
    pub fn as_slice_of<T: Pod>(&self, len: usize) -> Result<&[T]> {
        let bytes = self.typed_len::<T>(len)?;
        bytemuck::try_cast_slice(&self.as_slice()[..bytes]).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot view the segment as {}: {e}",
                std::any::type_name::<T>()
            ))
        })
    }

    /// As [`as_slice_of`](Self::as_slice_of), writable.
    ///
    /// # Errors
    /// As [`as_slice_of`](Self::as_slice_of).
    pub fn as_mut_slice_of<T: Pod>(&mut self, len: usize) -> Result<&mut [T]> {
        let bytes = self.typed_len::<T>(len)?;
        bytemuck::try_cast_slice_mut(&mut self.as_mut_slice()[..bytes]).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot view the segment as {}: {e}",
                std::any::type_name::<T>()
            ))
        })
    }

    fn typed_len<T>(&self, len: usize) -> Result<usize> {
        std::mem::size_of::<T>()
            .checked_mul(len)
            .filter(|&b| b <= self.size())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "shared memory {:?} of {} bytes is too small for {len} x {}",
                    self.name,
                    self.size(),
                    std::any::type_name::<T>()
                ))
            })
    }

    /// The start of the mapping in this process, for volatile or atomic access.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Unmaps the segment from this process (Python's `close`); same as dropping it.
    pub fn close(self) {}

    /// Removes the name now, from any process (Python's `unlink`): no new process can
    /// attach, and the memory is freed once every mapping is gone. An [`Error::Io`] of
    /// kind `NotFound` if the name is already gone.
    ///
    /// # Errors
    /// An [`Error::Io`] of kind `NotFound` if the name is already gone, or another [`Error::Io`] from the system.
    pub fn unlink(&self) -> Result<()> {
        // Only remove the segment we map, not a new one that took the name meanwhile.
        let ours = shm_named::identity(self.map.fd())?;
        match shm_named::identity_of(&self.name) {
            Ok(id) if id == ours => {}
            Ok(_) => {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("shared memory {:?} was already removed", self.name),
                )))
            }
            Err(e) => return Err(named_error(e, &self.name)),
        }
        shm_named::unlink(&self.name).map_err(|e| named_error(e, &self.name))?;
        forget_if_owner(&self.name);
        Ok(())
    }

    /// Takes the segment out of this process tree's care (see the [module docs](self)):
    /// it outlives the tree until someone calls [`unlink`](Self::unlink). Call it in the
    /// process that created (or adopted) the segment; elsewhere it does nothing. Python
    /// 3.13's `track=False`.
    ///
    /// # Errors
    /// An [`Error::Io`] if the segment watcher of this process tree cannot be told.
    pub fn persist(&self) -> Result<()> {
        if watcher_running() {
            watcher_call(Op::Forget, &self.name, 0)?;
        }
        Ok(())
    }
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("name", &self.name)
            .field("size", &self.size())
            .finish()
    }
}

/// A `SharedMemory` travels as its name and descriptor; the receiver maps it and is not
/// an owner.
impl Serialize for SharedMemory {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (&self.name, &self.map).serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedMemory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (name, map) = <(String, Mapping)>::deserialize(d)?;
        Ok(SharedMemory { name, map })
    }
}

fn check_name(name: &str) -> Result<&str> {
    let n = name.strip_prefix('/').unwrap_or(name);
    if n.is_empty() || n.len() > MAX_NAME || n.contains(['/', '\0']) || n == "." || n == ".." {
        return Err(Error::InvalidArgument(format!(
            "{name:?} is not a valid shared memory name (1 to {MAX_NAME} bytes, no '/' after the first, no NUL)"
        )));
    }
    Ok(n)
}

fn random_name() -> String {
    let mut b = [0u8; 8];
    sysproc::random_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("mp_{hex}")
}

fn named_error(e: io::Error, name: &str) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::Io(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no shared memory segment named {name:?}"),
        )),
        io::ErrorKind::AlreadyExists => Error::Io(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("a shared memory segment named {name:?} exists already"),
        )),
        _ => Error::Io(e),
    }
}

// ---- the watcher ---------------------------------------------------------------------

#[derive(Clone, Copy)]
#[repr(u8)]
enum Op {
    Create = b'C',
    Adopt = b'A',
    Forget = b'F',
}

struct Watcher {
    sock: OwnedFd,
}

static WATCHER: PerProcess<Mutex<Option<Watcher>>> = PerProcess::new(|| Mutex::new(None));

fn watcher_running() -> bool {
    WATCHER
        .get()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some()
}

fn forget_if_owner(name: &str) {
    if watcher_running() {
        let _ = watcher_call(Op::Forget, name, 0);
    }
}

/// Sends one request to this process's watcher (starting it if needed, restarting it
/// once if it died) and returns the descriptor that came back, if any.
fn watcher_call(op: Op, name: &str, size: u64) -> Result<Option<OwnedFd>> {
    let mut slot = WATCHER.get().lock().unwrap_or_else(|p| p.into_inner());
    let mut msg = Vec::with_capacity(9 + name.len());
    msg.push(op as u8);
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(name.as_bytes());
    let mut last = None;
    for _ in 0..2 {
        if slot.is_none() {
            *slot = Some(start_watcher()?);
        }
        let w = slot.as_ref().expect("just set");
        match request(w, &msg) {
            Ok((0, fd)) => return Ok(fd),
            Ok((errno, _)) => {
                return Err(named_error(io::Error::from_raw_os_error(errno), name));
            }
            Err(e) => {
                *slot = None;
                last = Some(e);
            }
        }
    }
    Err(Error::process(format!(
        "the shared memory watcher failed: {}",
        last.expect("set on failure")
    )))
}

fn request(w: &Watcher, msg: &[u8]) -> io::Result<(i32, Option<OwnedFd>)> {
    socket::sendmsg(w.sock.as_fd(), &[IoSlice::new(msg)], &[], false)?;
    let mut reply = [0u8; 4];
    let mut fds = Vec::new();
    let n = socket::recvmsg(w.sock.as_fd(), &mut reply, &mut fds, false)?;
    if n != 4 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the shared memory watcher closed its socket",
        ));
    }
    Ok((i32::from_le_bytes(reply), fds.pop()))
}

fn start_watcher() -> Result<Watcher> {
    let (ours, theirs) = socket::socketpair(Kind::SeqPacket)?;
    let (mut spec, theirs) = crate::popen::image_spec(WATCHER_ROLE, theirs, None)?;
    // The watcher may outlive us: it must not hold our stdout (a pipe someone waits on).
    let devnull = std::fs::OpenOptions::new().read(true).open("/dev/null")?;
    spec.fds.push((devnull.as_raw_fd(), 0));
    spec.fds.push((devnull.as_raw_fd(), 1));
    let sup = crate::popen::supervisor::get();
    let pid = sup.call(move || {
        let r = sysproc::spawn_image(&spec);
        drop(theirs);
        drop(devnull);
        r
    })?;
    // Reap it whenever it exits (normally after we are gone, but not always).
    let pidfd = sysproc::pidfd_open(pid)?;
    let watch = pidfd.try_clone()?;
    sup.watch(watch, move || {
        let _ = sysproc::waitid(pidfd.as_fd(), true, false);
    });
    // Tell it which process's end ends the tree (none: ours).
    if let Some(root) = tree_root().and_then(|pid| sysproc::pidfd_open(pid).ok()) {
        socket::sendmsg(
            ours.as_fd(),
            &[IoSlice::new(&[b'R'; 9])],
            &[root.as_raw_fd()],
            false,
        )?;
        let mut reply = [0u8; 4];
        socket::recvmsg(ours.as_fd(), &mut reply, &mut Vec::new(), false)?;
    }
    Ok(Watcher { sock: ours })
}

/// The main program of this process tree, if this process is not it: the ancestor as
/// many generations up as this process's identity is long (children are always children
/// of the process that started them).
fn tree_root() -> Option<u32> {
    let depth = crate::current_process().identity().len();
    let mut pid = sysproc::getpid();
    for _ in 0..depth {
        pid = crate::sys::ident::parent_of(pid)?;
        if pid <= 1 {
            return None;
        }
    }
    (depth > 0).then_some(pid)
}

/// The role name the watcher image is started with.
pub(crate) const WATCHER_ROLE: &str = "shm-watcher";

/// The watcher's life (runs before `main` in its own image; never returns). It creates
/// and opens segments for its creator, remembers them, and removes them when the tree's
/// main program ends (the creator itself, if it is the main program).
pub(crate) fn watcher_main(sock: OwnedFd) -> ! {
    // Outlive the owner on purpose: no parent-death signal, and ignore the signals a
    // terminal or a process-group kill would send, so the cleanup always runs.
    for sig in [
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGPIPE,
    ] {
        sysproc::set_signal_ignored(sig, true);
    }
    let mut owned: Vec<(String, (u64, u64))> = Vec::new();
    let mut creator = Some(sock);
    let mut root: Option<OwnedFd> = None;
    loop {
        let mut watched = Vec::new();
        watched.extend(creator.as_ref().map(|s| s.as_fd()));
        watched.extend(root.as_ref().map(|r| r.as_fd()));
        let ready = match poll_readable(&watched, None) {
            Ok(r) => r,
            Err(_) => break,
        };
        if root.is_some() && ready.last().is_some_and(|r| r.readable) {
            break; // the tree's main program ended
        }
        let Some(sock) = creator.as_ref().filter(|_| ready[0].readable) else {
            continue;
        };
        let mut buf = [0u8; 9 + MAX_NAME + 8];
        let mut fds = Vec::new();
        let n = match socket::recvmsg(sock.as_fd(), &mut buf, &mut fds, false) {
            Ok(n) if n >= 9 => n,
            _ => {
                // The creator ended: wait for the tree if there is anything to remove.
                creator = None;
                if root.is_none() || owned.is_empty() {
                    break;
                }
                continue;
            }
        };
        let op = buf[0];
        let size = u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes"));
        let name = String::from_utf8_lossy(&buf[9..n]).into_owned();
        let result: io::Result<Option<OwnedFd>> = match op {
            b'R' => {
                root = fds.pop();
                Ok(None)
            }
            b'C' => shm_named::create(&name, size).and_then(|fd| {
                owned.push((name.clone(), shm_named::identity(fd.as_fd())?));
                Ok(Some(fd))
            }),
            b'A' => shm_named::open(&name).and_then(|fd| {
                let id = shm_named::identity(fd.as_fd())?;
                owned.retain(|(n, _)| *n != name);
                owned.push((name.clone(), id));
                Ok(Some(fd))
            }),
            b'F' => {
                owned.retain(|(n, _)| *n != name);
                Ok(None)
            }
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let (code, fd) = match result {
            Ok(fd) => (0i32, fd),
            Err(e) => (e.raw_os_error().unwrap_or(libc::EIO), None),
        };
        let raw: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
        if socket::sendmsg(
            sock.as_fd(),
            &[IoSlice::new(&code.to_le_bytes())],
            &raw,
            false,
        )
        .is_err()
        {
            creator = None;
            if root.is_none() || owned.is_empty() {
                break;
            }
        }
    }
    // The tree (or, for the main program's own watcher, the creator) is gone: remove what
    // it still owned, but only the very segments we made (a name reused since is someone
    // else's).
    for (name, id) in owned {
        if shm_named::identity_of(&name).is_ok_and(|now| now == id) {
            let _ = shm_named::unlink(&name);
        }
    }
    sysproc::exit_now(0)
}
