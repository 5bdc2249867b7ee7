//! How a process ended, as the operating system reports it (re-exported by `error`).

use std::fmt;

/// How a process ended, as the operating system reported it.
///
/// [`ExitStatus::code`] follows Python's `Process.exitcode`: the exit status, or the
/// negative signal number when a signal killed the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ExitStatus {
    /// The process called `exit` (or returned) with this status.
    Exited(i32),
    /// The process was killed by this signal number.
    Signaled(i32),
}

impl ExitStatus {
    /// Python's `exitcode`: the status, or `-signal` when killed by a signal.
    ///
    /// ```
    /// use multiprocess::ExitStatus;
    /// assert_eq!(ExitStatus::Exited(3).code(), 3);
    /// assert_eq!(ExitStatus::Signaled(9).code(), -9);
    /// ```
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => -s,
        }
    }

    /// The signal that killed the process, if any.
    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Signaled(s) => Some(s),
            ExitStatus::Exited(_) => None,
        }
    }

    /// Whether the process exited with status 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled(s) => match signal_name(s) {
                Some(name) => write!(f, "signal {s} ({name})"),
                None => write!(f, "signal {s}"),
            },
        }
    }
}

/// The conventional name of a signal number (`SIGKILL` for 9), if it is a standard one.
pub fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}
