//! # multiprocess
//!
//! Python's [`multiprocessing`](https://docs.python.org/3/library/multiprocessing.html)
//! for Rust: run functions in separate processes — for isolation (a crash, abort, leak or
//! runaway task in one child never takes the program down), for killable timeouts, for
//! code that is not thread-safe — with the API Python users know.
//!
//! ```
//! use multiprocess::{current_process, Process};
//!
//! fn doubler(n: i32) {
//!     println!("{n} doubled to {} by {}", n * 2, current_process().name());
//! }
//!
//! let procs: Vec<Process> = [5, 10, 15].into_iter().map(|n| Process::new(doubler, n)).collect();
//! for p in &procs { p.start()?; }
//! for p in &procs { p.join()?; }
//! assert!(procs.iter().all(|p| p.exitcode() == Some(0)));
//! # Ok::<(), multiprocess::Error>(())
//! ```
//!
//! No call at the top of `main` is needed, and the same code works in `cargo test`,
//! doctests, examples and benchmarks: a child takes its role before `main` runs.
//!
//! ## How it works
//! * **Targets are code, not data.** A target is a fn item or a closure that captures
//!   nothing; the child finds it by its offset in the program image, after checking that
//!   it runs the same build (GNU build-id) as its parent.
//! * **Data is serde.** Args and results are any `Serialize + Deserialize` type. Handles
//!   such as a [`Connection`] travel inside them as file descriptors.
//! * **Start methods** as in Python: [`StartMethod::Forkserver`] (default),
//!   [`StartMethod::Spawn`], [`StartMethod::Fork`].
//! * **Nothing is left behind.** Children die with their parent, even when it is killed
//!   with `SIGKILL`; no zombies.
//!
//! ## Map of the crate (Python module → here)
//! | Python | Rust |
//! |---|---|
//! | `multiprocessing.Process`, `current_process`, `active_children`, `cpu_count` | [`process`], re-exported at the root |
//! | `multiprocessing.pool` (`Pool`, `AsyncResult`) | [`pool`]; across the hosts of an MPI job, `pool::mpi` (feature `mpi`, also at the root as `mpi`) |
//! | `multiprocessing.queues` (`Queue`, `SimpleQueue`, `JoinableQueue`) | [`queues`], re-exported at the root |
//! | `multiprocessing.connection` (`Pipe`, `Connection`, `Listener`, `Client`, `wait`) | [`connection`] |
//! | `multiprocessing.context` (`get_context`, `set_start_method`) | [`context`] |
//! | `multiprocessing.reduction`, `pickle` (for CPython peers) | [`reduction`], [`reduction::pickle`] |
//! | `multiprocessing.managers` (`Manager`, `BaseManager`, proxies) | [`managers`] |
//! | exceptions | [`Error`] |
//! | `multiprocessing.synchronize` (`Lock`, `RLock`, `Semaphore`, `Condition`, `Event`, `Barrier`, …) | [`synchronize`], re-exported at the root |
//! | `multiprocessing.sharedctypes` (`Value`, `Array`, `RawValue`, `RawArray`) | [`sharedctypes`], re-exported at the root |
//! | `multiprocessing.shared_memory` (`SharedMemory`) | [`shared_memory`] |
//!
//! ## Layers
//! Dependencies flow down only (checked by `tests/layering.rs`): the operating-system
//! layer (`sys`, the one home of free `unsafe`); [`error`], [`context`] (data only) and
//! [`reduction`]; [`connection`]; the child's side (`spawn`, with the children registry),
//! the start methods (`popen`) and [`process`]; [`shared_memory`], [`synchronize`] and
//! [`sharedctypes`]; [`queues`]; [`pool`] (with its MPI backend) and [`managers`]; and at
//! the top `bootstrap`, the hook that runs before `main` and the one place that knows
//! every role a new process can take (child, forkserver, segment watcher, MPI agent).
#![warn(missing_docs)]

mod bootstrap;
pub mod connection;
pub mod context;
pub mod error;
pub mod managers;
pub mod pool;
pub(crate) mod popen;
pub mod process;
pub mod queues;
pub mod reduction;
pub(crate) mod spawn;
pub(crate) mod sys;

pub mod shared_memory;
pub mod sharedctypes;
pub mod synchronize;

pub use connection::{pipe, pipe_simplex, AuthKey, Client, Connection, Listener};
pub use context::{
    get_all_start_methods, get_context, get_start_method, set_start_method, Context, StartMethod,
};
pub use error::{signal_name, Error, ExitStatus, Result};
pub use pool::{AsyncResult, IMap, Pool, PoolBuilder, PoolStats, WorkerStats};
pub use process::{active_children, cpu_count, spawn, Builder, JoinHandle, Process};
pub use queues::{JoinableQueue, PutError, Queue, SimpleQueue};
pub use spawn::target::{Outcome, Target};
pub use spawn::{current_process, parent_process, CurrentProcess, ParentProcess};

#[cfg(feature = "mpi")]
pub use pool::mpi;
pub use pool::Backend;
pub use shared_memory::SharedMemory;
pub use sharedctypes::{Array, ArrayGuard, Pod, RawArray, RawValue, Value, ValueGuard};
pub use synchronize::{
    Barrier, BoundedSemaphore, Condition, ConditionGuard, Event, Lock, LockGuard, RLock,
    RLockGuard, Semaphore, SemaphoreGuard,
};

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
