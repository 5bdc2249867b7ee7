//! Start methods and contexts (Python's `multiprocessing.context`).
//!
//! A [`Context`] is data: a start method and, optionally, the executable to run. The
//! objects it builds are built by their own modules, which add its constructors
//! ([`Context::builder`], [`Context::process`] and [`Context::spawn`] live with
//! [`Process`](crate::Process)); every other object takes a start method where it
//! starts processes (for example [`PoolBuilder::start_method`](crate::PoolBuilder::start_method)).

use crate::error::{Error, Result};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// How a child process is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartMethod {
    /// `fork()` the calling process. Fast, and the child sees a copy of the parent's
    /// memory, but a child of a process with several threads may find a lock that
    /// another thread held at the moment of the fork still held (stdio is protected, your
    /// own locks and allocators are not). Unlike CPython's fork, the child keeps only
    /// descriptors 0-2 (and what travels in its args), as with the other methods.
    /// Opt-in, as in CPython 3.14.
    Fork,
    /// Execute this program again (`/proc/self/exe`) and run the target in the fresh
    /// image, before its `main`. Safe with threads; the slowest.
    Spawn,
    /// Ask a small server, itself a fresh image of this program started on first use,
    /// to fork the child. Safe with threads and fast. The default, as in CPython 3.14.
    Forkserver,
}

impl StartMethod {
    /// Python's name for it: `"fork"`, `"spawn"`, `"forkserver"`.
    pub fn name(self) -> &'static str {
        match self {
            StartMethod::Fork => "fork",
            StartMethod::Spawn => "spawn",
            StartMethod::Forkserver => "forkserver",
        }
    }

    fn code(self) -> u8 {
        match self {
            StartMethod::Fork => 1,
            StartMethod::Spawn => 2,
            StartMethod::Forkserver => 3,
        }
    }

    fn from_code(c: u8) -> Option<StartMethod> {
        match c {
            1 => Some(StartMethod::Fork),
            2 => Some(StartMethod::Spawn),
            3 => Some(StartMethod::Forkserver),
            _ => None,
        }
    }
}

impl fmt::Display for StartMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StartMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fork" => Ok(StartMethod::Fork),
            "spawn" => Ok(StartMethod::Spawn),
            "forkserver" => Ok(StartMethod::Forkserver),
            other => Err(Error::process(format!("cannot find context for {other:?}"))),
        }
    }
}

static DEFAULT: AtomicU8 = AtomicU8::new(0);

/// The environment variable that, when set to a method name, chooses the default start
/// method of a program that does not call [`set_start_method`].
pub const START_METHOD_ENV: &str = "MULTIPROCESS_START_METHOD";

/// Sets the default start method, once (Python's `set_start_method`). Setting it again
/// to a different method is an error, as in Python.
///
/// ```
/// use multiprocess::StartMethod;
/// multiprocess::set_start_method(StartMethod::Spawn)?;
/// assert_eq!(multiprocess::get_start_method(), StartMethod::Spawn);
/// assert!(multiprocess::set_start_method(StartMethod::Fork).is_err());
/// # Ok::<(), multiprocess::Error>(())
/// ```
///
/// # Errors
/// [`Error::Process`] if a different start method was set already.
pub fn set_start_method(method: StartMethod) -> Result<()> {
    match DEFAULT.compare_exchange(0, method.code(), Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => Ok(()),
        Err(c) if c == method.code() => Ok(()),
        Err(_) => Err(Error::process("the start method has already been set")),
    }
}

/// The default start method: the one set with [`set_start_method`], else the one named
/// by `MULTIPROCESS_START_METHOD`, else [`StartMethod::Forkserver`].
pub fn get_start_method() -> StartMethod {
    if let Some(m) = StartMethod::from_code(DEFAULT.load(Ordering::SeqCst)) {
        return m;
    }
    std::env::var(START_METHOD_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(StartMethod::Forkserver)
}

/// Every start method this platform supports, the default first.
pub fn get_all_start_methods() -> Vec<StartMethod> {
    vec![
        StartMethod::Forkserver,
        StartMethod::Spawn,
        StartMethod::Fork,
    ]
}

/// A context: a start method (and executable) that processes are built with (Python's
/// `get_context`). Its process constructors are those of the crate root, bound to it.
///
/// ```
/// use multiprocess::{get_context, StartMethod};
/// fn add((a, b): (i32, i32)) -> i32 { a + b }
/// let ctx = get_context(StartMethod::Spawn);
/// assert_eq!(ctx.spawn(add, (2, 3))?.join()?, 5);
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Context {
    method: StartMethod,
    executable: Option<PathBuf>,
}

/// The context for `method`.
pub fn get_context(method: StartMethod) -> Context {
    Context {
        method,
        executable: None,
    }
}

impl Context {
    /// This context's start method.
    pub fn start_method(&self) -> StartMethod {
        self.method
    }

    /// Runs children from another executable (Python's `set_executable`). It must be the
    /// same build as this program: a different build is refused by the child with
    /// [`Error::ImageMismatch`]. Applies to `Spawn` children and to the forkserver.
    pub fn set_executable(&mut self, path: impl Into<PathBuf>) {
        self.executable = Some(path.into());
    }

    /// The executable children of this context run, if not this program.
    pub(crate) fn executable(&self) -> Option<&std::path::Path> {
        self.executable.as_deref()
    }
}
