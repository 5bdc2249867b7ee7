//! `Process`, `spawn` and friends (Python's `multiprocessing.process`).
//!
//! # Lifetime rules
//!
//! * A started child is always a child of this process, whatever the start method, and
//!   dies with it: if this process is killed (even by `SIGKILL`) its children get
//!   `SIGKILL` too, and so on down the tree.
//! * When this process exits normally (its `main` returns or it calls
//!   `std::process::exit`), daemonic children are terminated and the others are waited
//!   for, as Python does. A child process does the same when its target returns.
//! * Dropping every handle to a running `Process` detaches it: it keeps running, it is
//!   reaped as soon as it ends (no zombie), and it still counts for the rule above. Call
//!   [`Process::terminate`] or [`Process::kill`] first to stop it.

use crate::connection::Connection;
use crate::context::{get_start_method, Context, StartMethod};
use crate::error::{Error, ExitStatus, Result};
use crate::popen;
use crate::reduction::{self, Encoded};
use crate::spawn::target::{self, Outcome, Report, Target};
use crate::spawn::{self as spawnmod, children};
use crate::sys::fd::{poll_readable, poll_readable_spinning};
use crate::sys::process as sysproc;
use crate::sys::reactor::{FdWatch, Ready};
use crate::sys::socket::{self, Kind};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{self, Poll};
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Args kept until they are sent, type-erased.
trait Args: Send {
    fn encode(&self) -> Result<Encoded>;
}

impl<A: Serialize + Send> Args for A {
    fn encode(&self) -> Result<Encoded> {
        reduction::encode(self)
    }
}

struct Pending {
    entry: i64,
    args: Box<dyn Args>,
}

/// A started child.
struct Running {
    pid: u32,
    pidfd: OwnedFd,
    channel: Connection,
    status: Mutex<Option<ExitStatus>>,
}

impl Running {
    /// Reaps the child if it has exited; returns its status once known.
    fn try_reap(&self) -> Result<Option<ExitStatus>> {
        let mut s = lock(&self.status);
        if s.is_none() {
            *s = sysproc::waitid(self.pidfd.as_fd(), true, false)?;
        }
        Ok(*s)
    }

    fn status(&self) -> Option<ExitStatus> {
        *lock(&self.status)
    }

    /// Waits for the child to exit (up to `timeout`) and reaps it.
    ///
    /// Looks for the end for [`JOIN_SPIN`] before it sleeps (see
    /// [`poll_readable_spinning`]): a child that is about to end (a short task, joined
    /// right after it was started) is then seen to end at once, not after a sleeping
    /// thread's wake-up. At most that much CPU goes to joining a child that runs on.
    fn wait(&self, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.status() {
            return Ok(Some(s));
        }
        if !poll_readable_spinning(&[self.pidfd.as_fd()], timeout, JOIN_SPIN)?[0].readable {
            return Ok(None);
        }
        self.try_reap()
    }

    fn signal(&self, sig: i32) -> Result<()> {
        if self.status().is_none() {
            sysproc::pidfd_send_signal(self.pidfd.as_fd(), sig)?;
        }
        Ok(())
    }
}

struct Inner {
    name: Mutex<String>,
    daemon: AtomicBool,
    method: StartMethod,
    executable: Option<PathBuf>,
    identity: Vec<u32>,
    pending: Mutex<Option<Pending>>,
    running: Mutex<Option<Arc<Running>>>,
    closed: AtomicBool,
    handles: AtomicUsize,
}

impl Inner {
    fn running(&self) -> Option<Arc<Running>> {
        lock(&self.running).clone()
    }
}

/// How long a join checks for the child's end before it sleeps (see `Running::wait`):
/// about what a whole start costs, so that joining a trivial child never sleeps.
const JOIN_SPIN: Duration = Duration::from_micros(200);

/// Args up to this size are written to the child's channel before it is started.
const PRESEND_MAX: usize = 16 << 10;

impl children::Child for Inner {
    fn is_daemon(&self) -> bool {
        self.daemon.load(Ordering::SeqCst)
    }

    fn terminate(&self) {
        if let Some(r) = self.running() {
            let _ = r.signal(libc::SIGTERM);
        }
    }

    fn wait(&self) {
        if let Some(r) = self.running() {
            let _ = r.wait(None);
        }
    }

    fn try_reap(&self) -> bool {
        match self.running() {
            Some(r) => !matches!(r.try_reap(), Ok(None)),
            None => true,
        }
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

fn register(inner: &Arc<Inner>) {
    children::register(inner.clone());
}

fn unregister(inner: &Inner) {
    children::unregister(inner as *const Inner);
}

/// A process object: a target and its args, run in a child process once started.
/// Python's `multiprocessing.Process`.
///
/// ```
/// use multiprocess::Process;
///
/// fn greet(name: String) {
///     println!("hello {name}");
/// }
///
/// let p = Process::new(greet, "bob".to_string());
/// p.start()?;
/// p.join()?;
/// assert_eq!(p.exitcode(), Some(0));
/// # Ok::<(), multiprocess::Error>(())
/// ```
///
/// A `Process` is a cheap handle: clones refer to the same child, and every method takes
/// `&self`, so one thread may `join` while another calls `terminate`. See the
/// [module docs](crate::process) for what happens when handles are dropped.
pub struct Process {
    inner: Arc<Inner>,
}

impl Clone for Process {
    fn clone(&self) -> Self {
        self.inner.handles.fetch_add(1, Ordering::SeqCst);
        Process {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.inner.handles.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        // The last handle: hand an unfinished child to the supervisor, which reaps it
        // the moment it ends.
        let Some(r) = self.inner.running() else {
            return;
        };
        if !matches!(r.try_reap(), Ok(None)) {
            unregister(&self.inner);
            return;
        }
        let Ok(watch) = r.pidfd.try_clone() else {
            return;
        };
        let inner = self.inner.clone();
        popen::supervisor::get().watch(watch, move || {
            if let Some(r) = inner.running() {
                let _ = r.try_reap();
            }
            unregister(&inner);
        });
    }
}

/// Configures a [`Process`] before it is made (like `std::thread::Builder`).
///
/// ```
/// use multiprocess::{Process, StartMethod};
/// fn work() {}
/// let p = Process::builder().name("Test").daemon(true).start_method(StartMethod::Spawn).build(work, ());
/// assert_eq!(p.name(), "Test");
/// assert!(p.daemon());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Builder {
    name: Option<String>,
    daemon: bool,
    method: Option<StartMethod>,
    executable: Option<PathBuf>,
}

impl Builder {
    /// A builder with the defaults: `Process-N`, not daemonic, the default start method.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// The process's name (default `Process-N`).
    pub fn name(mut self, name: impl Into<String>) -> Builder {
        self.name = Some(name.into());
        self
    }

    /// Whether the process is daemonic: terminated, rather than waited for, when its
    /// parent exits.
    pub fn daemon(mut self, daemon: bool) -> Builder {
        self.daemon = daemon;
        self
    }

    /// The start method (default: [`crate::get_start_method`]).
    pub fn start_method(mut self, method: StartMethod) -> Builder {
        self.method = Some(method);
        self
    }

    /// Runs the child from this executable (see
    /// [`Context::set_executable`](crate::Context::set_executable)).
    pub fn executable(mut self, path: impl Into<PathBuf>) -> Builder {
        self.executable = Some(path.into());
        self
    }

    /// Makes the process (not started yet).
    pub fn build<F, A, M>(self, target: F, args: A) -> Process
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Outcome,
    {
        let entry = target::process_entry::<F, A, M>();
        // The child makes its own copy of the (zero-sized) target.
        std::mem::forget(target);
        self.make(entry, Box::new(args))
    }

    /// Makes and starts a process whose target returns a value, and returns the handle
    /// that gives it back.
    ///
    /// # Errors
    /// [`Error::Serialization`] if the args cannot be encoded, [`Error::Io`] or
    /// [`Error::Process`] if the child cannot be started.
    pub fn spawn<F, A, M>(self, target: F, args: A) -> Result<JoinHandle<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned,
    {
        let entry = target::call_entry::<F, A, M>();
        std::mem::forget(target);
        let process = self.make(entry, Box::new(args));
        process.start()?;
        Ok(JoinHandle {
            process,
            watch: Default::default(),
            _value: PhantomData,
        })
    }

    fn make(self, entry: i64, args: Box<dyn Args>) -> Process {
        let (identity, default_name) = spawnmod::next_child_identity();
        Process {
            inner: Arc::new(Inner {
                name: Mutex::new(self.name.unwrap_or(default_name)),
                daemon: AtomicBool::new(self.daemon),
                method: self.method.unwrap_or_else(get_start_method),
                executable: self.executable,
                identity,
                pending: Mutex::new(Some(Pending { entry, args })),
                running: Mutex::new(None),
                closed: AtomicBool::new(false),
                handles: AtomicUsize::new(1),
            }),
        }
    }
}

impl Process {
    /// A new process that will run `target(args)`; several arguments travel as a tuple,
    /// none as `()`. Python's `Process(target=f, args=(...))`.
    ///
    /// The target must be a fn item or a closure that captures nothing; anything it needs
    /// goes in `args`, which may hold handles such as a [`Connection`].
    pub fn new<F, A, M>(target: F, args: A) -> Process
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Outcome,
    {
        Builder::new().build(target, args)
    }

    /// A [`Builder`] for name, daemon flag and start method.
    pub fn builder() -> Builder {
        Builder::new()
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::SeqCst) {
            Err(Error::Closed("process object"))
        } else {
            Ok(())
        }
    }

    fn started(&self) -> Result<Arc<Running>> {
        self.check_open()?;
        self.inner
            .running()
            .ok_or_else(|| Error::process("the process has not been started"))
    }

    /// Starts the child. A process can be started once.
    ///
    /// With the forkserver (the default method), the args travel with the start request
    /// when they are small (up to 16 KiB with the child's boot message) and carry no
    /// descriptor, and `start` looks for the server's reply for up to 200 µs before it
    /// sleeps: a start and a join cost little more than a bare `fork`, `_exit` and wait.
    ///
    /// # Errors
    /// [`Error::Process`] if the process was already started or closed;
    /// [`Error::Serialization`] if its args cannot be encoded; [`Error::Io`] if the child
    /// cannot be started.
    pub fn start(&self) -> Result<()> {
        self.check_open()?;
        let pending = lock(&self.inner.pending)
            .take()
            .ok_or_else(|| Error::process("cannot start a process twice"))?;
        let encoded = match pending.args.encode() {
            Ok(e) => e,
            Err(e) => {
                *lock(&self.inner.pending) = Some(pending);
                return Err(e);
            }
        };
        children::reap_finished();
        let (parent_end, child_end) = socket::socketpair(Kind::Stream)?;
        let channel = Connection::from_fd(parent_end, true, true);
        let boot_msg = spawnmod::boot_for(
            pending.entry,
            &self.name(),
            &self.inner.identity,
            self.daemon(),
        );
        let boot = match reduction::encode(&boot_msg) {
            Ok(b) => b,
            Err(e) => {
                *lock(&self.inner.pending) = Some(pending);
                return Err(e);
            }
        };
        let send = |c: &Connection| -> Result<()> {
            if encoded.fds.is_empty() {
                // Both frames in one write.
                c.send_frames(&[&boot.bytes, &encoded.bytes])
            } else {
                c.send_frame(&boot.bytes, &[])?;
                c.send_frame(&encoded.bytes, &encoded.fds)
            }
        };
        // Small boot messages and args without descriptors go with the request for the
        // child where the method allows it (see `popen::launch`): the child finds them in
        // its memory and reads nothing before it runs its target.
        let inline = (self.inner.method != StartMethod::Spawn
            && encoded.fds.is_empty()
            && boot.bytes.len() + encoded.bytes.len() < popen::INLINE_MAX)
            .then(|| spawnmod::inline(&boot_msg, &boot.bytes, &encoded.bytes))
            .filter(|b| b.len() <= popen::INLINE_MAX);
        // Otherwise, small ones are written while the child is being made (the forkserver
        // forks meanwhile), so that the child finds them waiting instead of waiting for
        // this thread to be scheduled again; large ones could fill the socket buffer
        // with nobody reading, so they follow the launch.
        let presend = encoded.bytes.len() <= PRESEND_MAX;
        let mut present = Ok(());
        let launched = popen::launch(
            self.inner.method,
            child_end,
            self.inner.executable.as_deref(),
            inline.as_deref(),
            &mut || {
                if presend {
                    present = send(&channel);
                }
            },
        );
        let (pid, inlined) = match launched {
            Ok(launched) => launched,
            Err(e) => {
                *lock(&self.inner.pending) = Some(pending);
                return Err(e);
            }
        };
        let pidfd = match sysproc::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = sysproc::kill(pid, libc::SIGKILL);
                return Err(e.into());
            }
        };
        if let Err(e) = present {
            // The child cannot run without its boot message: it must not run at all, and
            // the process can be started again.
            let _ = sysproc::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
            let _ = sysproc::waitid(pidfd.as_fd(), false, false);
            *lock(&self.inner.pending) = Some(pending);
            return Err(e);
        }
        let running = Arc::new(Running {
            pid,
            pidfd,
            channel,
            status: Mutex::new(None),
        });
        *lock(&self.inner.running) = Some(running.clone());
        register(&self.inner);
        let sent = if presend || inlined {
            Ok(())
        } else {
            send(&running.channel)
        };
        drop(encoded);
        drop(pending);
        if let Err(e) = sent {
            // The child cannot run without its boot message; make sure it is gone.
            let _ = running.signal(libc::SIGKILL);
            let _ = running.wait(None);
            return Err(e);
        }
        Ok(())
    }

    /// Waits until the child ends (Python's `join()`). Like Python, this succeeds however
    /// the child ended; look at [`exitcode`](Self::exitcode).
    ///
    /// For the first 200 µs it checks without sleeping, yielding the CPU between checks,
    /// so that a short child's end is seen at once rather than after a sleeping thread's
    /// wake-up; then it sleeps until the child ends.
    ///
    /// # Errors
    /// [`Error::Process`] if the process was never started or was closed; [`Error::Io`] if
    /// waiting fails.
    pub fn join(&self) -> Result<()> {
        self.join_timeout_opt(None).map(drop)
    }

    /// Waits up to `timeout` for the child to end; returns whether it did (Python's
    /// `join(timeout)`, which you would follow with `exitcode`).
    ///
    /// ```
    /// use multiprocess::Process;
    /// use std::time::Duration;
    /// fn nap() { std::thread::sleep(Duration::from_secs(30)) }
    /// let p = Process::new(nap, ());
    /// p.start()?;
    /// assert!(!p.join_timeout(Duration::from_millis(10))?);
    /// p.kill()?;
    /// assert!(p.join_timeout(Duration::from_secs(10))?);
    /// assert_eq!(p.exitcode(), Some(-9));
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`join`](Self::join).
    #[doc(alias = "join")]
    pub fn join_timeout(&self, timeout: Duration) -> Result<bool> {
        self.join_timeout_opt(Some(timeout))
    }

    /// Waits for the child to end without blocking the thread that polls the future: the
    /// async form of [`join`](Self::join), for any async runtime (the wait is one
    /// descriptor in the crate's reactor, not a thread).
    ///
    /// ```
    /// use multiprocess::Process;
    /// fn work() {}
    /// let p = Process::new(work, ());
    /// p.start()?;
    /// futures::executor::block_on(p.join_async())?;
    /// assert_eq!(p.exitcode(), Some(0));
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Process`] if the process was never started or is closed; an OS error.
    pub async fn join_async(&self) -> Result<()> {
        let r = self.started()?;
        let mut watch = FdWatch::new();
        std::future::poll_fn(|cx| -> Poll<Result<()>> {
            if r.try_reap()?.is_some() {
                return Poll::Ready(Ok(()));
            }
            watch.arm(r.pidfd.as_fd(), Ready::Read, cx.waker())?;
            Poll::Pending
        })
        .await?;
        unregister(&self.inner);
        Ok(())
    }

    fn join_timeout_opt(&self, timeout: Option<Duration>) -> Result<bool> {
        let r = self.started()?;
        let done = r.wait(timeout)?.is_some();
        if done {
            unregister(&self.inner);
        }
        Ok(done)
    }

    /// Whether the child has been started and has not ended.
    pub fn is_alive(&self) -> bool {
        match self.inner.running() {
            Some(r) if !self.inner.closed.load(Ordering::SeqCst) => {
                matches!(r.try_reap(), Ok(None))
            }
            _ => false,
        }
    }

    /// The child's pid, once started.
    #[doc(alias = "ident")]
    pub fn pid(&self) -> Option<u32> {
        self.inner.running().map(|r| r.pid)
    }

    /// The name: `Process-N` by default.
    pub fn name(&self) -> String {
        lock(&self.inner.name).clone()
    }

    /// Renames the process; a name set before `start` is the one the child sees.
    pub fn set_name(&self, name: impl Into<String>) {
        *lock(&self.inner.name) = name.into();
    }

    /// Whether the process is daemonic.
    pub fn daemon(&self) -> bool {
        self.inner.daemon.load(Ordering::SeqCst)
    }

    /// Sets the daemon flag; only before `start`, as in Python.
    ///
    /// # Errors
    /// [`Error::Process`] if the process has already started.
    pub fn set_daemon(&self, daemon: bool) -> Result<()> {
        if self.inner.running().is_some() {
            return Err(Error::process("the process has already started"));
        }
        self.inner.daemon.store(daemon, Ordering::SeqCst);
        Ok(())
    }

    /// The start method this process uses.
    pub fn start_method(&self) -> StartMethod {
        self.inner.method
    }

    /// How the child ended, Python style: `None` while it runs (or before it starts),
    /// the exit status once it exited, `-N` if signal `N` killed it.
    pub fn exitcode(&self) -> Option<i32> {
        self.exit_status().map(ExitStatus::code)
    }

    /// How the child ended, once it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.inner
            .running()
            .and_then(|r| r.try_reap().ok().flatten())
    }

    /// Sends `SIGTERM` (Python's `terminate()`). Nothing happens if it already ended.
    ///
    /// # Errors
    /// [`Error::Io`] if the signal cannot be sent.
    pub fn terminate(&self) -> Result<()> {
        self.started()?.signal(libc::SIGTERM)
    }

    /// Sends `SIGKILL` (Python's `kill()`). Nothing happens if it already ended.
    ///
    /// # Errors
    /// [`Error::Io`] if the signal cannot be sent.
    pub fn kill(&self) -> Result<()> {
        self.started()?.signal(libc::SIGKILL)
    }

    /// Sends any signal to the running child.
    ///
    /// # Errors
    /// [`Error::Io`] if the signal cannot be sent.
    pub fn send_signal(&self, signal: i32) -> Result<()> {
        self.started()?.signal(signal)
    }

    /// A descriptor that becomes readable when the child ends (Python's `sentinel`), for
    /// use with `poll`/`epoll`. Valid until the process is closed.
    pub fn sentinel(&self) -> Option<RawFd> {
        self.inner.running().map(|r| r.pidfd.as_raw_fd())
    }

    /// Releases the process's resources (Python's `close()`). An error while the child
    /// still runs; afterwards most methods return [`Error::Closed`].
    ///
    /// # Errors
    /// [`Error::Process`] if the process is still running.
    pub fn close(&self) -> Result<()> {
        if let Some(r) = self.inner.running() {
            if matches!(r.try_reap(), Ok(None)) {
                return Err(Error::process(
                    "cannot close a process while it is still running; join() or terminate() it first",
                ));
            }
        }
        self.inner.closed.store(true, Ordering::SeqCst);
        *lock(&self.inner.running) = None;
        unregister(&self.inner);
        Ok(())
    }

    fn channel_report(&self) -> Option<Arc<Running>> {
        self.inner.running()
    }
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name())
            .field("pid", &self.pid())
            .field("daemon", &self.daemon())
            .field("exitcode", &self.exitcode())
            .finish()
    }
}

/// Like Python's repr: `<Process name='Process-1' pid=123 parent=100 started>`.
impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match (self.pid(), self.exitcode()) {
            (None, _) => "initial".to_string(),
            (Some(_), None) => "started".to_string(),
            (Some(_), Some(c)) => format!("stopped exitcode={c}"),
        };
        write!(f, "<Process name='{}'", self.name())?;
        if let Some(pid) = self.pid() {
            write!(f, " pid={pid} parent={}", sysproc::getpid())?;
        }
        write!(f, " {state}")?;
        if self.daemon() {
            write!(f, " daemon")?;
        }
        write!(f, ">")
    }
}

/// The handle of a process started with [`spawn`]: joining it gives back the target's
/// return value.
#[must_use = "a child is waited for at exit unless you join or terminate it"]
pub struct JoinHandle<R> {
    process: Process,
    /// Armed while the handle is awaited: the report channel and the pidfd.
    watch: [FdWatch; 2],
    _value: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> JoinHandle<R> {
    /// Waits for the child and returns what its target returned.
    ///
    /// Errors: [`Error::Panicked`] with the panic's message and location if the target
    /// panicked; [`Error::WorkerDied`] naming the signal or exit code if the child ended
    /// without answering (it crashed, called `exit`, or was killed); [`Error::ImageMismatch`]
    /// if the child runs another build.
    ///
    /// # Errors
    /// [`Error::Process`] if the process was never started or was closed; [`Error::Io`] if
    /// waiting fails.
    pub fn join(self) -> Result<R> {
        self.join_ref()
    }

    fn join_ref(&self) -> Result<R> {
        let r = self
            .process
            .channel_report()
            .ok_or_else(|| Error::process("the process has not been started"))?;
        let died = |r: &Running| -> Result<R> {
            let status = match r.wait(None)? {
                Some(s) => s,
                None => return Err(Error::process("the child could not be waited for")),
            };
            Err(Error::WorkerDied {
                pid: r.pid,
                status,
                task: None,
            })
        };
        loop {
            let ready =
                poll_readable_spinning(&[r.channel.as_fd(), r.pidfd.as_fd()], None, JOIN_SPIN)?;
            if ready[0].readable {
                return match r.channel.recv::<Report>() {
                    Ok(report) => self.finish(&r, report, false),
                    // The child hung up (or broke off mid-message) without a report.
                    Err(_) => died(&r),
                };
            }
            if ready[1].readable {
                r.try_reap()?;
                // It ended: whatever it sent is already buffered, so read without waiting.
                return match r.channel.recv_nowait::<Report>() {
                    Ok(report) => self.finish(&r, report, true),
                    Err(_) => died(&r),
                };
            }
        }
    }

    fn finish(&self, r: &Running, report: Report, ended: bool) -> Result<R> {
        let result = match report {
            Report::Returned => {
                let value = if ended {
                    r.channel.recv_nowait::<R>()
                } else {
                    target::recv_value::<R>(&r.channel)
                };
                match value {
                    Ok(v) => Ok(v),
                    Err(e @ Error::Serialization(_)) => Err(e),
                    Err(_) => {
                        let status = r.wait(None)?.unwrap_or(ExitStatus::Exited(0));
                        return Err(Error::WorkerDied {
                            pid: r.pid,
                            status,
                            task: None,
                        });
                    }
                }
            }
            other => spawnmod::report_error(other).map(|()| unreachable!("only Returned is Ok")),
        };
        r.wait(None)?;
        unregister(&self.process.inner);
        result
    }

    /// Whether the child has finished (its result is ready, or it ended).
    pub fn is_finished(&self) -> bool {
        match self.process.inner.running() {
            Some(r) => poll_readable(&[r.channel.as_fd(), r.pidfd.as_fd()], Some(Duration::ZERO))
                .map(|v| v.iter().any(|x| x.readable))
                .unwrap_or(true),
            None => false,
        }
    }

    /// The underlying process (pid, name, terminate, kill...).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.process
            .pid()
            .expect("a JoinHandle's process is started")
    }
}

/// Awaiting a `JoinHandle` is [`join`](JoinHandle::join) without blocking the thread that
/// polls it, under any async runtime.
///
/// ```
/// fn square(x: u64) -> u64 { x * x }
/// let h = multiprocess::spawn(square, 7)?;
/// assert_eq!(futures::executor::block_on(h)?, 49);
/// # Ok::<(), multiprocess::Error>(())
/// ```
impl<R: DeserializeOwned> Future for JoinHandle<R> {
    type Output = Result<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<Result<R>> {
        let this = self.get_mut();
        let Some(r) = this.process.channel_report() else {
            return Poll::Ready(Err(Error::process("the process has not been started")));
        };
        let ready = poll_readable(&[r.channel.as_fd(), r.pidfd.as_fd()], Some(Duration::ZERO))?;
        if ready.iter().any(|x| x.readable) {
            return Poll::Ready(this.join_ref());
        }
        let [a, b] = &mut this.watch;
        a.arm(r.channel.as_fd(), Ready::Read, cx.waker())?;
        b.arm(r.pidfd.as_fd(), Ready::Read, cx.waker())?;
        Poll::Pending
    }
}

impl<R> fmt::Debug for JoinHandle<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("process", &self.process)
            .finish()
    }
}

/// Runs `target(args)` in a new child process and returns a handle whose
/// [`join`](JoinHandle::join) gives back the return value — `std::thread::spawn`, across
/// a process boundary. Several arguments travel as a tuple.
///
/// ```
/// fn square(x: u64) -> u64 { x * x }
/// let h = multiprocess::spawn(square, 12)?;
/// assert_eq!(h.join()?, 144);
///
/// fn boom(_: ()) -> u8 { panic!("no luck") }
/// match multiprocess::spawn(boom, ())?.join() {
///     Err(multiprocess::Error::Panicked { message, .. }) => assert_eq!(message, "no luck"),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), multiprocess::Error>(())
/// ```
///
/// # Errors
/// [`Error::Serialization`] if the args cannot be encoded, [`Error::Io`] or
/// [`Error::Process`] if the child cannot be started.
pub fn spawn<F, A, M>(target: F, args: A) -> Result<JoinHandle<F::Output>>
where
    F: Target<A, M>,
    A: Serialize + DeserializeOwned + Send + 'static,
    F::Output: Serialize + DeserializeOwned,
{
    Builder::new().spawn(target, args)
}

/// The process constructors of a [`Context`] (Python's `ctx.Process`).
impl Context {
    /// A process builder bound to this context.
    pub fn builder(&self) -> Builder {
        let b = Builder::new().start_method(self.start_method());
        match self.executable() {
            Some(p) => b.executable(p.to_path_buf()),
            None => b,
        }
    }

    /// A new (not yet started) process (Python's `ctx.Process(target=, args=)`).
    pub fn process<F, A, M>(&self, target: F, args: A) -> Process
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Outcome,
    {
        self.builder().build(target, args)
    }

    /// Starts a process that returns a value (like `std::thread::spawn`).
    ///
    /// # Errors
    /// [`Error::Serialization`] if the args cannot be encoded, [`Error::Io`] or
    /// [`Error::Process`] if the child cannot be started.
    pub fn spawn<F, A, M>(&self, target: F, args: A) -> Result<JoinHandle<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned,
    {
        self.builder().spawn(target, args)
    }
}

/// The children of this process that are still running; finished ones are reaped
/// (Python's `active_children()`).
pub fn active_children() -> Vec<Process> {
    children::reap_finished();
    children::snapshot()
        .into_iter()
        .filter_map(|c| c.as_any().downcast::<Inner>().ok())
        .map(|inner| {
            inner.handles.fetch_add(1, Ordering::SeqCst);
            Process { inner }
        })
        .collect()
}

/// The number of CPUs this process may use (Python's `cpu_count()`; this respects CPU
/// affinity and cgroup quotas, like Python 3.13's `process_cpu_count()`).
///
/// ```
/// assert!(multiprocess::cpu_count() >= 1);
/// ```
pub fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
