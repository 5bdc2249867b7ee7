//! Life before `main`: the start-up hook and the roles a process started by this crate
//! can take.
//!
//! A constructor in `.init_array` runs in every process of a program that links this
//! crate, before `main`. It looks at the environment: a process started as a child, a
//! forkserver or a shared-memory segment watcher (named by `MULTIPROCESS_ROLE`), or a
//! rank of an MPI launch, takes that [`Role`] here and never returns to `main`. This is
//! the one module that knows every role; each role's code lives in the layer that owns
//! it, and nothing below this module knows the others.
#![allow(unsafe_code)]

use crate::sys::process as sysproc;
use crate::sys::{fd, image};

/// Exit code of a process whose role could not be taken (its parent vanished, or the
/// role variable was malformed).
const EXIT_NO_ROLE: i32 = 70;

/// What a new process started by this crate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A child started by `Process` or `Pool` (any start method): runs its target
    /// ([`crate::spawn::child_main`]).
    Child,
    /// The forkserver, which forks children on request ([`crate::popen::forkserver`]).
    Forkserver,
    /// The shared-memory segment watcher, which removes a tree's segments when it ends
    /// ([`crate::shared_memory`]).
    SegmentWatcher,
    /// A rank of an MPI launch: rank 0 goes on to `main`, every other rank becomes a
    /// worker agent ([`crate::pool::mpi`]).
    #[cfg(feature = "mpi")]
    MpiAgent,
}

impl Role {
    /// Every role started through `MULTIPROCESS_ROLE`.
    const STARTED: [Role; 3] = [Role::Child, Role::Forkserver, Role::SegmentWatcher];

    /// The name the starting layer puts in `MULTIPROCESS_ROLE` (each owner defines it).
    fn env_name(self) -> Option<&'static str> {
        match self {
            Role::Child => Some(crate::spawn::CHILD_ROLE),
            Role::Forkserver => Some(crate::popen::forkserver::ROLE),
            Role::SegmentWatcher => Some(crate::shared_memory::WATCHER_ROLE),
            #[cfg(feature = "mpi")]
            Role::MpiAgent => None,
        }
    }

    fn from_env_name(name: &str) -> Option<Role> {
        Role::STARTED
            .into_iter()
            .find(|r| r.env_name() == Some(name))
    }
}

/// The role this process was started in, if any, with its channel descriptor and the
/// pid of the parent that started it. Takes the variable out of the environment.
/// Never returns for a malformed variable.
fn role_from_env() -> Option<(Role, std::os::fd::OwnedFd, u32)> {
    let var = crate::spawn::ROLE_ENV;
    let value = std::env::var_os(var)?;
    std::env::remove_var(var);
    let value = value.to_string_lossy().into_owned();
    let mut parts = value.split(':');
    let (role, fd, ppid) = (
        parts.next().and_then(Role::from_env_name),
        parts.next().and_then(|s| s.parse().ok()),
        parts.next().and_then(|s| s.parse().ok()),
    );
    let (Some(role), Some(fd), Some(ppid)) = (role, fd, ppid) else {
        eprintln!("multiprocess: malformed {var}={value:?}");
        sysproc::exit_now(EXIT_NO_ROLE);
    };
    // SAFETY: our parent placed the channel at this number for us (posix_spawn file
    // actions) and nothing else in this fresh image owns it.
    match unsafe { fd::adopt(fd) } {
        Ok(fd) => Some((role, fd, ppid)),
        Err(e) => {
            eprintln!("multiprocess: no channel at fd {fd}: {e}");
            sysproc::exit_now(EXIT_NO_ROLE);
        }
    }
}

/// The role of a rank of an MPI launch, if the environment says this is one.
#[cfg(feature = "mpi")]
fn role_from_launch() -> Option<Role> {
    crate::pool::mpi::launched_by_env().then_some(Role::MpiAgent)
}

/// Takes this process's role, if it has one (and then never returns, except on rank 0
/// of an MPI launch).
fn enter_role() {
    // A set-uid/set-gid program must not let its environment choose code to run.
    if sysproc::is_secure_exec() {
        return;
    }
    if let Some((role, channel, ppid)) = role_from_env() {
        // A re-exec of /proc/self/exe is called `exe` in ps and top: name it after the
        // program again (forked children inherit the name).
        sysproc::name_after_program();
        match role {
            Role::Child => {
                crate::spawn::child_main(channel, ppid, crate::spawn::Origin::Fresh, None)
            }
            Role::Forkserver => crate::popen::forkserver::serve(channel, ppid),
            Role::SegmentWatcher => crate::shared_memory::watcher_main(channel),
            #[cfg(feature = "mpi")]
            Role::MpiAgent => {}
        }
    }
    // Under an MPI launch, MPI starts here and the ranks other than 0 become worker
    // agents (never returning).
    #[cfg(feature = "mpi")]
    if role_from_launch() == Some(Role::MpiAgent) {
        crate::pool::mpi::enter_launch();
    }
}

/// The constructor. glibc calls `.init_array` entries with `(argc, argv, envp)`.
extern "C" fn on_load(
    _argc: libc::c_int,
    _argv: *const *const libc::c_char,
    _envp: *const *const libc::c_char,
) {
    // Settle the build identity now, while the process has one thread: computed lazily
    // it could be caught half-done by a fork, and the child would wait on it for ever.
    let _ = image::build_id();
    // A panic must not unwind out of an `extern "C"` function called by the loader.
    if std::panic::catch_unwind(enter_role).is_err() {
        sysproc::exit_now(EXIT_NO_ROLE);
    }
}

// SAFETY (of the attribute): `.init_array` holds pointers to functions of exactly this
// signature; the loader calls each once, single-threaded, before `main`. `#[used]` keeps
// the entry even though nothing refers to it.
#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn(libc::c_int, *const *const libc::c_char, *const *const libc::c_char) =
    on_load;

#[cfg(test)]
mod tests {
    use super::Role;

    #[test]
    fn role_names_are_distinct_and_round_trip() {
        let names: Vec<&str> = Role::STARTED.iter().filter_map(|r| r.env_name()).collect();
        assert_eq!(names.len(), Role::STARTED.len());
        for r in Role::STARTED {
            assert_eq!(Role::from_env_name(r.env_name().unwrap()), Some(r));
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert_eq!(Role::from_env_name("no-such-role"), None);
    }
}
