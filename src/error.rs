//! The crate's one error type, mirroring Python's `multiprocessing` exceptions.
//!
//! | Python                         | Rust                                   |
//! |--------------------------------|----------------------------------------|
//! | `ProcessError`                 | [`Error::Process`] (and the base of all) |
//! | `BufferTooShort`               | [`Error::BufferTooShort`]              |
//! | `AuthenticationError`          | [`Error::Authentication`]              |
//! | `TimeoutError`                 | [`Error::Timeout`]                     |
//! | `EOFError` from `recv`         | [`Error::Eof`]                         |
//! | an exception raised in a child | [`Error::Panicked`]                    |
//! | `RemoteError`, an exception raised by a managed object | [`Error::Remote`] |
//!
//! On top of those, what Rust users need: [`Error::WorkerDied`] when a child ends without
//! answering (signal or exit code), [`Error::Serialization`], [`Error::Io`],
//! [`Error::Protocol`] for malformed data from a peer, and [`Error::ImageMismatch`] when a
//! child runs a different build than its parent.

use std::fmt;
use std::io;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub use crate::sys::status::{signal_name, ExitStatus};

/// Every error this crate reports. Match on the variant; the messages are for people.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Misuse of a process object or another process-level failure (Python's `ProcessError`).
    #[doc(alias = "ProcessError")]
    #[error("process error: {0}")]
    Process(String),

    /// A timed operation ran out of time (Python's `TimeoutError`). For a pool task that
    /// overran its timeout, `task` names it and `pid` the worker that was killed for it
    /// (as in [`Error::WorkerDied`]); both are `None` for any other wait. Match it as
    /// `Error::Timeout { .. }`.
    #[doc(alias = "TimeoutError")]
    #[error("{}", match (.task, .pid) {
        (Some(t), Some(p)) => format!("task {t} timed out: its worker (pid {p}) was killed"),
        (Some(t), None) => format!("task {t} timed out"),
        _ => "timed out".to_string(),
    })]
    Timeout {
        /// The worker killed for the task, if a pool task timed out.
        pid: Option<u32>,
        /// The task (for pools: the index of the item), if a pool task timed out.
        task: Option<u64>,
    },

    /// `recv_bytes_into` was given a buffer smaller than the message; the whole message is
    /// carried here and the connection stays usable (Python's `BufferTooShort`).
    #[error("buffer too short for a message of {} bytes", .0.len())]
    BufferTooShort(Vec<u8>),

    /// The peer failed the authkey handshake, or rejected ours (Python's
    /// `AuthenticationError`). The text matches CPython's.
    #[doc(alias = "AuthenticationError")]
    #[error("authentication failed: {0}")]
    Authentication(String),

    /// The peer closed the connection before a message began (Python's `EOFError`).
    #[doc(alias = "EOFError")]
    #[error("end of file: the peer closed the connection")]
    Eof,

    /// A target panicked in the child; `location` is `file:line:column`.
    #[error("the target panicked at {location}: {message}")]
    Panicked {
        /// The panic message.
        message: String,
        /// Where the panic happened, `file:line:column` (empty if unknown).
        location: String,
    },

    /// A child process ended without delivering its result: it exited, aborted, crashed or
    /// was killed. `task` names the task it was running, where there was one.
    #[error("{} (pid {pid}) died with {status} before answering", match .task { Some(t) => format!("the worker running task {t}"), None => "the process".to_string() })]
    WorkerDied {
        /// The process id of the dead child.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
        /// The task (for pools: the index of the item) it was running, if known.
        task: Option<u64>,
    },

    /// A value could not be encoded or decoded.
    #[error("serialization error: {0}")]
    Serialization(String),

    /// A peer sent bytes that break the protocol (a corrupt frame, a bad length, a
    /// truncated message). The connection that produced it should be discarded.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// A child is running a different build of the program than its parent, so code
    /// addresses cannot be trusted; nothing was run.
    #[error("the child runs a different build of the program (parent build {parent}, child build {child})")]
    ImageMismatch {
        /// The parent's build identity, hex.
        parent: String,
        /// The child's build identity, hex.
        child: String,
    },

    /// A pool worker went over its memory limit while running `task` and was killed.
    #[error("task {} used {used} bytes, over the worker memory limit of {limit} bytes", match .task { Some(t) => t.to_string(), None => "?".into() })]
    MemoryLimit {
        /// The task (item index) that was running.
        task: Option<u64>,
        /// The limit, in bytes.
        limit: u64,
        /// The resident memory seen, in bytes.
        used: u64,
    },

    /// The work was cancelled (`AsyncResult::cancel`), or the pool was terminated or
    /// dropped before it finished.
    #[error("cancelled")]
    Cancelled,

    /// The object was closed (a `Process` after `close`, a `Connection` after `close`).
    #[error("{0} is closed")]
    Closed(&'static str),

    /// A manager server answered a method call with an exception: `exception` is the
    /// Python class name (`KeyError`, `IndexError`, `queue.Empty` shows as `Empty`…), or
    /// `RemoteError` when the server failed (unknown object or method, bad request), with
    /// its text in `message` (Python's `multiprocessing.managers.RemoteError`).
    #[doc(alias = "RemoteError")]
    #[error("{exception} raised by the manager: {message}")]
    Remote {
        /// The exception class name (`RemoteError` for a server-side failure).
        exception: String,
        /// Its arguments or traceback text.
        message: String,
    },

    /// An operating-system error.
    #[error(transparent)]
    Io(#[from] io::Error),

    /// A lock or semaphore was released more often than it was acquired: an unlocked
    /// [`Lock`](crate::Lock), or a [`BoundedSemaphore`](crate::BoundedSemaphore) already
    /// at its bound (Python's `ValueError: semaphore or lock released too many times`).
    #[error("semaphore or lock released too many times")]
    ReleasedTooOften,

    /// An [`RLock`](crate::RLock) was released by a thread that does not hold it
    /// (Python's `RuntimeError: cannot release un-acquired lock`).
    #[error("cannot release un-acquired lock: the calling thread does not hold it")]
    NotOwner,

    /// The [`Barrier`](crate::Barrier) is broken: a wait timed out, it was aborted or
    /// reset, or a waiting process died (Python's `BrokenBarrierError`).
    #[doc(alias = "BrokenBarrierError")]
    #[error("the barrier is broken")]
    BrokenBarrier,

    /// An argument is out of its domain: a zero size, a bad shared-memory name, a segment
    /// too small for what it should hold (Python's `ValueError`).
    #[doc(alias = "ValueError")]
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A queue had no room for the item before the deadline (Python's `queue.Full`).
    /// The operations that can fail this way hand the item back in
    /// [`PutError::Full`](crate::queues::PutError::Full); this variant is what it becomes
    /// under `?`.
    #[doc(alias = "queue.Full")]
    #[error("the queue is full")]
    Full,

    /// A queue had no item before the deadline (Python's `queue.Empty`): `try_get`, or
    /// `get_timeout` running out of time.
    #[doc(alias = "queue.Empty")]
    #[error("the queue is empty")]
    Empty,

    /// [`JoinableQueue::task_done`](crate::JoinableQueue::task_done) was called more times
    /// than items were put (Python's `ValueError: task_done() called too many times`).
    #[error("task_done() called too many times")]
    TaskDoneTooOften,

    /// [`JoinableQueue::join`](crate::JoinableQueue::join) cannot end: every unfinished
    /// task is an item taken by a process that died before `task_done` and that cannot be
    /// delivered again (too large to keep a copy of, or taken while streamed). `count`
    /// such items are lost; a `task_done` for each lets `join` end.
    #[error("{count} unfinished task(s) were taken by processes that died, and cannot be delivered again")]
    TasksLost {
        /// How many items were lost.
        count: u64,
    },

    /// A task failed on another host of an MPI job (the `mpi` feature): `error` is what
    /// happened there ([`Error::Panicked`], [`Error::WorkerDied`], [`Error::Timeout`],
    /// …, with `task` numbered as in the call), `host` and `rank` say where.
    /// [`Error::local`] unwraps it.
    #[error("on host {host} (MPI rank {rank}): {error}")]
    OnHost {
        /// The host name of the agent that ran the task.
        host: String,
        /// The agent's MPI rank.
        rank: i32,
        /// What went wrong there.
        error: Box<Error>,
    },
}

impl Error {
    pub(crate) fn process(msg: impl Into<String>) -> Self {
        Error::Process(msg.into())
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        Error::Protocol(msg.into())
    }

    /// A plain timeout (no task, no worker).
    pub(crate) fn timeout() -> Self {
        Error::Timeout {
            pid: None,
            task: None,
        }
    }

    pub(crate) fn serialization(e: impl fmt::Display) -> Self {
        Error::Serialization(e.to_string())
    }

    /// The error itself, without the [`Error::OnHost`] wrapper that says on which host
    /// it happened: lets the same `match` serve local and MPI pools.
    ///
    /// ```
    /// use multiprocess::Error;
    /// let timeout = Error::Timeout { pid: Some(4242), task: Some(7) };
    /// let e = Error::OnHost { host: "node7".into(), rank: 2, error: Box::new(timeout) };
    /// assert!(matches!(e.local(), Error::Timeout { task: Some(7), .. }));
    /// ```
    pub fn local(&self) -> &Error {
        match self {
            Error::OnHost { error, .. } => error.local(),
            e => e,
        }
    }

    /// Whether this is [`Error::Timeout`] (or an I/O error of kind `TimedOut`).
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::OnHost { error, .. } => error.is_timeout(),
            Error::Timeout { .. } => true,
            Error::Io(e) => e.kind() == io::ErrorKind::TimedOut,
            _ => false,
        }
    }
}
