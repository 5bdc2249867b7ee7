//! `Pool` — a fixed set of worker processes that run a function over many inputs
//! (Python's `multiprocessing.Pool`), and never hangs when a worker dies.
//!
//! ```
//! use multiprocess::Pool;
//!
//! fn square(x: i64) -> i64 { x * x }
//!
//! let pool = Pool::new(2)?;
//! assert_eq!(pool.map(square, 1..=5)?, vec![1, 4, 9, 16, 25]);
//!
//! // Several arguments: the target's parameters are filled from a tuple (starmap).
//! fn add(a: i64, b: i64) -> i64 { a + b }
//! assert_eq!(pool.starmap(add, vec![(1, 2), (3, 4)])?, vec![3, 7]);
//!
//! // One call, asynchronously.
//! let r = pool.apply_async(square, 12)?;
//! assert_eq!(r.get()?, 144);
//! # Ok::<(), multiprocess::Error>(())
//! ```
//!
//! # Failures are values
//! * A task that panics gives [`Error::Panicked`] for that item.
//! * A worker that aborts, segfaults, calls `exit` or is killed gives
//!   [`Error::WorkerDied`] naming the item (`task`) and the signal or exit status; the worker
//!   is replaced and every other item still runs. With [`PoolBuilder::retries`] the item is
//!   tried again on another worker first.
//! * With [`PoolBuilder::timeout`], an item that runs too long has its worker killed
//!   (`SIGTERM`, then `SIGKILL` after [`PoolBuilder::grace`]) and gives [`Error::Timeout`].
//! * [`Pool::schedule`] gives one task its own timeout and retries; its
//!   [`Error::Timeout`] names the task and the worker's pid.
//! * `map` returns the first error in item order; `imap` yields each item's `Result`.
//!
//! # Async and observability
//! [`AsyncResult`] is a `Future`, [`IMap`] and [`as_completed`] are `Stream`s: awaiting
//! them never blocks the runtime's thread. A dropped `AsyncResult` takes its tasks that
//! have not started off the queue. [`worker_id`] tells a task which worker slot runs it.
//! The dispatcher records `tracing` events (target `multiprocess`) when workers start,
//! exit, die (WARN, with the signal and the task), are replaced, and when tasks are
//! retried, time out, are cancelled or hit the memory limit; each `map`/`imap` call is a
//! span.
//!
//! # Inputs by reference
//! Items need not be owned: any item that [`Borrow`]s the target's argument type will do
//! (`&A`, `Box<A>`, `Arc<A>`, …), and it is encoded straight from the borrow, so a batch of
//! large buffers is never cloned to be sent. `map` and `starmap` (and their `_async` and
//! `_chunked` forms) take any iterator, `&[Vec<u8>]` or `.iter()` of a collection: they
//! encode the whole input before they return, so nothing is borrowed afterwards. `imap` and
//! `imap_unordered` pull their input lazily on the pool's thread, so theirs must own its
//! items or borrow `'static` data (`Arc<Vec<u8>>` items, say).
//!
//! ```
//! use multiprocess::Pool;
//!
//! fn total(img: Vec<u8>) -> u64 { img.iter().map(|&b| b as u64).sum() }
//!
//! let images: Vec<Vec<u8>> = vec![vec![1; 1 << 20], vec![2; 1 << 20]];
//! let pool = Pool::new(2)?;
//! // `&images`: each `&Vec<u8>` is encoded as the `Vec<u8>` it points to; no clone.
//! assert_eq!(pool.map(total, &images)?, [1 << 20, 2 << 20]);
//! assert_eq!(pool.map(total, images.iter().rev())?, [2 << 20, 1 << 20]);
//! // Items that own a shared buffer go to `imap` as well.
//! let shared: Vec<std::sync::Arc<Vec<u8>>> = images.into_iter().map(Into::into).collect();
//! let sums: Vec<u64> = pool.imap(total, shared)?.collect::<Result<_, _>>()?;
//! assert_eq!(sums, [1 << 20, 2 << 20]);
//! # Ok::<(), multiprocess::Error>(())
//! ```
//!
//! Items are sent to workers in chunks: by default about four per worker (as Python
//! does), and `map` ends a chunk early once its items take 1 MiB, so that big items (an
//! image each) spread over the workers one by one. If a worker dies in the middle of a chunk, the
//! items of that chunk that it had already finished are run again (their results died
//! with it): use a chunk size of 1 where an item must never run twice. A worker sends the
//! results of quick items in batches (never holding one back for more than 0.5 ms), and
//! keeps those it holds where the pool finds them if it dies: a crash loses no finished
//! item's result.
//!
//! Some of your code runs in this process, on the pool's own thread: a lazy `imap`'s
//! input iterator and its items' `Serialize`, and the `Deserialize` of its results. A
//! panic there fails that call where it happened ([`Error::Panicked`] at the item being
//! pulled, which ends the input; [`Error::Serialization`] for a result) and the pool goes
//! on. A `map` encodes its items on the calling thread, so a panic there unwinds out of
//! the call, and the pool still finishes its other work.

mod dispatcher;
mod jobs;
#[cfg(feature = "mpi")]
pub mod mpi;
mod result;
mod schedule;
mod task;

pub use result::{as_completed, AsCompleted, AsyncResult, IMap};
pub use schedule::Schedule;

use crate::context::{get_start_method, StartMethod};
use crate::error::{Error, Result};
use crate::process::cpu_count;
use crate::spawn::target::Target;
use dispatcher::Source;
use dispatcher::{Command, Config, Dispatcher, IterSource, Job, Shared, TaskOptions};
#[cfg(feature = "mpi")]
use result::Sink;
use result::{finish_one, finish_vec, Cell, CollectSink, Stream, StreamSink};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::borrow::Borrow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use task::AsBorrowed;

/// What a pool has done so far ([`Pool::stats`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PoolStats {
    /// Items that produced a value.
    pub tasks_completed: u64,
    /// Items that failed (panic, worker death, timeout, encoding).
    pub tasks_failed: u64,
    /// Workers started to replace one that died or retired.
    pub workers_replaced: u64,
    /// Every worker the pool has started, in order.
    pub workers: Vec<WorkerStats>,
}

/// One worker's share of the work.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct WorkerStats {
    /// `PoolWorker-N`.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Whether it is still running.
    pub alive: bool,
    /// Items it completed.
    pub tasks_completed: u64,
    /// Items it returned as failures (panics).
    pub tasks_failed: u64,
    /// Time from handing it work to receiving the results, summed.
    pub busy: Duration,
}

/// Configures a [`Pool`] (Python's `Pool(processes, initializer, initargs,
/// maxtasksperchild)` and more).
///
/// ```
/// use multiprocess::{Pool, StartMethod};
/// use std::time::Duration;
///
/// fn slow_or_fast(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
///
/// let pool = Pool::builder()
///     .processes(2)
///     .maxtasksperchild(100)
///     .start_method(StartMethod::Forkserver)
///     .timeout(Duration::from_millis(500))
///     .build()?;
/// let results: Vec<_> = pool.imap(slow_or_fast, [1, 10_000, 2])?.collect();
/// assert_eq!(results[0].as_ref().ok(), Some(&1));
/// assert!(matches!(results[1], Err(multiprocess::Error::Timeout { .. }))); // killed after 500 ms
/// assert_eq!(results[2].as_ref().ok(), Some(&2));
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    processes: usize,
    max_tasks: Option<u64>,
    init: Option<(i64, Vec<u8>)>,
    fin: Option<(i64, Vec<u8>)>,
    /// An initializer's or finalizer's args that could not be encoded: `build` fails.
    hook_error: Option<String>,
    method: Option<StartMethod>,
    timeout: Option<Duration>,
    grace: Duration,
    retries: u32,
    progress: bool,
    memory_limit: Option<u64>,
    backend: Backend,
}

/// Where a [`Pool`]'s workers run ([`PoolBuilder::backend`]).
///
/// ```
/// use multiprocess::{Backend, Pool};
/// // Always local worker processes, even when the program runs under `mpirun`.
/// let pool = Pool::builder().processes(2).backend(Backend::Local).build()?;
/// assert_eq!(pool.map(|x: u32| x + 1, [1, 2])?, [2, 3]);
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The default: the MPI agents when the program was started by an MPI launcher
    /// (`mpirun`, `srun`) with more than one rank and built with the `mpi` feature;
    /// local worker processes otherwise.
    #[default]
    Auto,
    /// Local worker processes on this machine.
    Local,
    /// The worker agents of the other MPI ranks (see the `mpi` module; needs the `mpi`
    /// feature and an MPI launch, else [`PoolBuilder::build`] fails with
    /// [`Error::InvalidArgument`]).
    Mpi,
}

impl Default for PoolBuilder {
    fn default() -> Self {
        PoolBuilder {
            processes: 0,
            max_tasks: None,
            init: None,
            fin: None,
            hook_error: None,
            method: None,
            timeout: None,
            grace: Duration::from_secs(1),
            retries: 0,
            progress: false,
            memory_limit: None,
            backend: Backend::Auto,
        }
    }
}

impl PoolBuilder {
    /// The number of workers; 0 (the default) means [`cpu_count`].
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = n;
        self
    }

    /// Replace each worker after it has run this many tasks (chunks), as Python's
    /// `maxtasksperchild`: bounds what a leaky task can accumulate.
    pub fn maxtasksperchild(mut self, n: u64) -> Self {
        self.max_tasks = Some(n.max(1));
        self
    }

    /// Runs `f(args)` once in every worker when it starts (also in replacements), before
    /// any task: for per-worker state such as a connection or a loaded model, kept in a
    /// `static` of your own. Args that cannot be encoded make [`build`](Self::build) fail.
    pub fn initializer<F, A, M>(mut self, f: F, args: A) -> Self
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned,
    {
        self.init = self.hook::<F, A, M>(f, &args);
        self
    }

    /// Runs `f(args)` in every worker when it exits normally (the pool is closed, or the
    /// worker retires after [`maxtasksperchild`](Self::maxtasksperchild)): to flush or
    /// close what the initializer opened (mpire's `worker_exit`). Not run in a worker that
    /// is killed (timeout, cancel, terminate) or crashes.
    ///
    /// ```
    /// use multiprocess::{pool::worker_id, Pool};
    /// fn goodbye(dir: String) {
    ///     let id = worker_id().unwrap();
    ///     std::fs::write(format!("{dir}/worker-{id}"), "done").unwrap();
    /// }
    /// let dir = std::env::temp_dir().join(format!("fin-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let pool = Pool::builder()
    ///     .processes(2)
    ///     .finalizer(goodbye, dir.display().to_string())
    ///     .build()?;
    /// pool.close();
    /// pool.join()?;
    /// assert!(dir.join("worker-0").exists() && dir.join("worker-1").exists());
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    pub fn finalizer<F, A, M>(mut self, f: F, args: A) -> Self
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned,
    {
        self.fin = self.hook::<F, A, M>(f, &args);
        self
    }

    fn hook<F, A, M>(&mut self, f: F, args: &A) -> Option<(i64, Vec<u8>)>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned,
    {
        let entry = task::init_entry::<F, A, M>();
        std::mem::forget(f);
        match crate::reduction::encode_append(args, Vec::new()) {
            Ok(bytes) => Some((entry, bytes)),
            Err(e) => {
                self.hook_error.get_or_insert(e.to_string());
                None
            }
        }
    }

    /// The start method of the workers (default: [`get_start_method`]).
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.method = Some(method);
        self
    }

    /// The longest one item may run. An item that takes longer has its worker killed and
    /// replaced, and fails with [`Error::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long a timed-out worker gets between `SIGTERM` and `SIGKILL` (default 1 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Runs an item again, on a fresh worker, when its worker died running it, up to `n`
    /// times before failing it with [`Error::WorkerDied`].
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// Shows a progress bar on stderr for each call (tasks done, rate, time left), when
    /// stderr is a terminal. Off by default.
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Caps each worker's resident memory at `bytes`: a worker found above it (checked
    /// every 20 ms while it runs an item) is killed and replaced, and that item fails with
    /// [`Error::MemoryLimit`] — instead of the machine's OOM killer choosing a victim.
    /// A spike faster than the check can still reach the OOM killer; for a hard wall use
    /// a cgroup.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Where the workers run: local processes or the agents of an MPI job (default
    /// [`Backend::Auto`]: MPI when launched by `mpirun`/`srun`, local otherwise). Under
    /// MPI, [`processes`](Self::processes) is the total number of workers across the
    /// agents (0: each agent's default, see the `mpi` module).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    // MPI hook: an agent builds its local pool with the initializer it was sent, as is.
    #[cfg(feature = "mpi")]
    pub(crate) fn raw_initializer(mut self, init: Option<(i64, Vec<u8>)>) -> Self {
        self.init = init;
        self
    }

    /// Starts the workers.
    ///
    /// # Errors
    /// An initializer's or finalizer's args that could not be encoded
    /// ([`Error::Serialization`]); [`Error::Io`] or [`Error::Process`] if the workers
    /// cannot be started; [`Error::InvalidArgument`] for a backend this program cannot use.
    pub fn build(self) -> Result<Pool> {
        if let Some(e) = &self.hook_error {
            return Err(Error::Serialization(format!(
                "the args of the pool's initializer or finalizer: {e}"
            )));
        }
        let asked = self.processes;
        let processes = if self.processes == 0 {
            cpu_count()
        } else {
            self.processes
        };
        let cfg = Config {
            processes,
            max_tasks: self.max_tasks,
            init: self.init,
            fin: self.fin,
            method: self.method.unwrap_or_else(get_start_method),
            timeout: self.timeout,
            grace: self.grace,
            retries: self.retries,
            progress: self.progress,
            memory_limit: self.memory_limit,
        };
        let shared = Shared::new()?;
        // Under an MPI launch the agents run the work (see [`mpi`]).
        #[cfg(feature = "mpi")]
        let remote = mpi::pool_dispatcher(self.backend, asked, &cfg, &shared)?;
        #[cfg(not(feature = "mpi"))]
        let remote: Option<(usize, Box<dyn FnOnce() + Send>)> = match self.backend {
            Backend::Mpi => {
                let _ = asked;
                return Err(Error::InvalidArgument(
                    "Backend::Mpi needs the crate's `mpi` feature".into(),
                ));
            }
            _ => None,
        };
        let (processes, run): (usize, Box<dyn FnOnce() + Send>) = match remote {
            Some(r) => r,
            None => {
                let dispatcher = Dispatcher::new(cfg, shared.clone())?;
                (processes, Box::new(move || dispatcher.run()))
            }
        };
        let thread = std::thread::Builder::new()
            .name("multiprocess-pool".into())
            .spawn(run)
            .map_err(Error::Io)?;
        Ok(Pool {
            shared,
            thread: Mutex::new(Some(thread)),
            processes,
            next_job: AtomicU64::new(1),
            closed: Mutex::new(false),
        })
    }
}

/// The tracing span of one pool call (target `multiprocess`): the dispatcher records its
/// events about that call's tasks (deaths, timeouts, retries) inside it.
fn call_span(call: &'static str, items: impl Into<Option<usize>>) -> tracing::Span {
    let items = items.into();
    match call {
        "map" => tracing::info_span!(target: "multiprocess", "map", items),
        "apply" => tracing::info_span!(target: "multiprocess", "apply"),
        "imap" => tracing::info_span!(target: "multiprocess", "imap"),
        "imap_unordered" => tracing::info_span!(target: "multiprocess", "imap_unordered"),
        _ => tracing::info_span!(target: "multiprocess", "schedule"),
    }
}

/// The slot of the pool worker this code runs in, `0..processes`: a worker that replaces
/// one that died or retired takes over its slot. `None` outside a pool worker (mpire's
/// `worker_id`).
///
/// ```
/// use multiprocess::{pool::worker_id, Pool};
/// fn which(_: u32) -> Option<usize> { worker_id() }
/// let pool = Pool::new(2)?;
/// for id in pool.map(which, 0..8)? {
///     assert!(matches!(id, Some(0 | 1)));
/// }
/// assert_eq!(worker_id(), None);
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub fn worker_id() -> Option<usize> {
    task::worker_slot()
}

/// A pool of worker processes (Python's `multiprocessing.Pool`).
///
/// Dropping a pool terminates it, as leaving Python's `with Pool() as p:` block does:
/// unfinished calls fail with [`Error::Cancelled`]. Call [`close`](Self::close) and then
/// [`join`](Self::join) to let queued work finish first.
pub struct Pool {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    processes: usize,
    next_job: AtomicU64,
    closed: Mutex<bool>,
}

/// With the default chunk size, a chunk ends early once its items take this many bytes:
/// chunks exist to spread the cost of a message over many small items, and big items
/// gain nothing from it, while a worker waits for its whole chunk before it starts and the
/// last chunks leave the other workers idle.
const CHUNK_BYTES: usize = 1 << 20;

/// The input of a `map` or `apply`, encoded by the caller's thread (the items may borrow
/// from it): all of it before the job is submitted when it is one chunk, otherwise chunk
/// by chunk while the pool already sends the first ones to workers; the memory of sent
/// chunks comes back to be encoded into again.
#[derive(Clone, Default)]
struct Fed(Arc<Mutex<FedState>>);

#[derive(Default)]
struct FedState {
    chunks: VecDeque<(u64, Result<Vec<u8>>)>,
    /// Frames already sent, to encode the next chunks in.
    spares: Vec<Vec<u8>>,
    /// Every chunk has been pushed.
    done: bool,
}

/// How many sent frames a [`Fed`] input keeps for its encoder.
const FED_SPARES: usize = 4;

impl Fed {
    fn lock(&self) -> MutexGuard<'_, FedState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Memory to encode the next chunk in (empty if none came back yet).
    fn spare(&self) -> Vec<u8> {
        self.lock().spares.pop().unwrap_or_default()
    }

    fn push(&self, chunk: (u64, Result<Vec<u8>>)) {
        self.lock().chunks.push_back(chunk);
    }

    fn finish(&self) {
        self.lock().done = true;
    }

    fn is_done(&self) -> bool {
        self.lock().done
    }
}

/// Ends a [`Fed`] input when dropped, and wakes the dispatcher to see it.
struct FedEnd<'a>(&'a Fed, &'a Shared);

impl Drop for FedEnd<'_> {
    fn drop(&mut self) {
        self.0.finish();
        self.1.poke();
    }
}

impl Source for Fed {
    fn next_chunk(&mut self, _max: usize, spare: Vec<u8>) -> Option<(u64, Result<Vec<u8>>)> {
        let mut f = self.lock();
        if spare.capacity() > 0 && f.spares.len() < FED_SPARES && !f.done {
            f.spares.push(spare);
        }
        f.chunks.pop_front()
    }

    fn more_later(&mut self) -> bool {
        let f = self.lock();
        !f.done || !f.chunks.is_empty()
    }
}

/// Python's default chunk size for `map`: about four chunks per worker.
fn default_chunksize(len: usize, processes: usize) -> usize {
    let per = processes.max(1) * 4;
    len.div_ceil(per).max(1)
}

impl Pool {
    /// A pool of `processes` workers (0: [`cpu_count`]) with the default settings.
    ///
    /// # Errors
    /// As [`PoolBuilder::build`].
    pub fn new(processes: usize) -> Result<Pool> {
        PoolBuilder::default().processes(processes).build()
    }

    /// A [`PoolBuilder`].
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The number of workers.
    pub fn processes(&self) -> usize {
        self.processes
    }

    /// What the pool has done so far: per-worker tasks, failures and busy time.
    pub fn stats(&self) -> PoolStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn check_open(&self) -> Result<()> {
        if *self.closed.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(Error::process("the pool is closed"));
        }
        if let Some(why) = self
            .shared
            .refusing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(Error::process(why));
        }
        Ok(())
    }

    /// Queues `job` (its `id` is given here); returns the id.
    fn submit(&self, mut job: Job) -> Result<u64> {
        self.check_open()?;
        job.id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let id = job.id;
        self.shared.send(Command::Submit(job));
        Ok(id)
    }

    // MPI hook: an agent runs chunk frames received from rank 0 as they are.
    #[cfg(feature = "mpi")]
    pub(crate) fn submit_raw(
        &self,
        entry: i64,
        count: u64,
        source: Box<dyn Source>,
        sink: Box<dyn Sink>,
    ) -> Result<u64> {
        self.submit(Job {
            id: 0,
            entry,
            chunksize: count as usize,
            source,
            sink,
            window: None,
            len: Some(count),
            opts: TaskOptions::default(),
            span: tracing::Span::current(),
        })
    }

    // MPI hook: cancels a job started by `submit_raw`.
    #[cfg(feature = "mpi")]
    pub(crate) fn cancel_raw(&self, id: u64) {
        self.shared.send(Command::Cancel(id));
    }

    fn canceller(&self, id: u64) -> Box<dyn Fn() + Send + Sync> {
        self.commander(id, Command::Cancel)
    }

    fn commander(&self, id: u64, cmd: fn(u64) -> Command) -> Box<dyn Fn() + Send + Sync> {
        let shared = Arc::downgrade(&self.shared);
        Box::new(move || {
            if let Some(s) = shared.upgrade() {
                s.send(cmd(id));
            }
        })
    }

    fn collect_async<F, A, M, T, I>(
        &self,
        items: I,
        chunksize: Option<usize>,
        finish: result::Finish<F::Output, T>,
    ) -> Result<AsyncResult<T>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        T: Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A>,
    {
        let items: Vec<I::Item> = items.into_iter().collect();
        let span = call_span("map", items.len());
        self.collect_async_with::<F, A, M, T, _>(
            items,
            chunksize,
            finish,
            TaskOptions::default(),
            span,
        )
    }

    fn collect_async_with<F, A, M, T, I>(
        &self,
        items: I,
        chunksize: Option<usize>,
        finish: result::Finish<F::Output, T>,
        opts: TaskOptions,
        span: tracing::Span,
    ) -> Result<AsyncResult<T>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        T: Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A>,
    {
        let items: Vec<I::Item> = items.into_iter().collect();
        let n = items.len();
        let cell = Cell::new();
        let max_bytes = match chunksize {
            Some(_) => usize::MAX,
            None => CHUNK_BYTES,
        };
        let chunksize = chunksize
            .unwrap_or_else(|| default_chunksize(n, self.processes))
            .max(1);
        let sink = CollectSink::new(n, finish, cell.clone());
        let entry = task::chunk_entry::<F, A, M>();
        // The items may borrow from the caller, so they are encoded here and now, chunk by
        // chunk, straight from the borrow; owned items are dropped as soon as encoded. An
        // input of several chunks is encoded while the pool runs the first ones.
        let mut items = items.into_iter().map(AsBorrowed::<_, A>::new);
        let mut ends = Vec::new();
        let mut encode = |fed: &Fed| {
            task::encode_chunk(&mut items, chunksize, max_bytes, fed.spare(), &mut ends)
        };
        let fed = Fed::default();
        if n <= chunksize {
            // One chunk (an `apply`): ready before the job is, no wake-up needed.
            while let Some(chunk) = encode(&fed) {
                fed.push(chunk);
            }
            fed.finish();
        }
        let id = self.submit(Job {
            id: 0,
            entry,
            chunksize,
            source: Box::new(fed.clone()),
            sink: Box::new(sink),
            window: None,
            len: Some(n as u64),
            opts,
            span,
        })?;
        if !fed.is_done() {
            // The input ends however encoding ends, a panic in an item's `Serialize`
            // included: the job is never left waiting for chunks that will not come.
            let end = FedEnd(&fed, &self.shared);
            while let Some(chunk) = encode(&fed) {
                fed.push(chunk);
                self.shared.poke();
            }
            drop(end);
        }
        Ok(AsyncResult::new(cell, self.canceller(id))
            .forgetting(self.commander(id, Command::Forget)))
    }

    /// Applies `f` to every item, in parallel, and returns the results in order
    /// (Python's `map`). The first failed item (in item order) is the error.
    ///
    /// The items may be the target's argument type `A` or anything that borrows as one
    /// (`&A` from `&[A]` or `.iter()`, `Box<A>`, `Arc<A>`): they are encoded straight from
    /// the borrow, all of them before this returns (see [Inputs by
    /// reference](self#inputs-by-reference)).
    ///
    /// ```
    /// use multiprocess::Pool;
    /// fn len(s: String) -> usize { s.len() }
    /// let words = vec!["pool".to_string(), "of".to_string(), "workers".to_string()];
    /// let pool = Pool::new(2)?;
    /// assert_eq!(pool.map(len, &words)?, [4, 2, 7]); // borrowed: `words` is still ours
    /// assert_eq!(pool.map(len, words)?, [4, 2, 7]); // owned
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    pub fn map<F, A, M, I>(&self, f: F, items: I) -> Result<Vec<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A>,
    {
        self.map_async(f, items)?.get()
    }

    /// [`map`](Self::map) with an explicit chunk size (items per message to a worker).
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    #[doc(alias = "map")]
    pub fn map_chunked<F, A, M, I>(
        &self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Result<Vec<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A>,
    {
        self.map_async_chunked(f, items, chunksize)?.get()
    }

    /// [`map`](Self::map), returning at once with an [`AsyncResult`].
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    pub fn map_async<F, A, M, I>(&self, f: F, items: I) -> Result<AsyncResult<Vec<F::Output>>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A>,
    {
        std::mem::forget(f);
        self.collect_async::<F, A, M, _, _>(items, None, finish_vec)
    }

    /// [`map_async`](Self::map_async) with an explicit chunk size.
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    #[doc(alias = "map_async")]
    pub fn map_async_chunked<F, A, M, I>(
        &self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Result<AsyncResult<Vec<F::Output>>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A>,
    {
        std::mem::forget(f);
        self.collect_async::<F, A, M, _, _>(items, Some(chunksize), finish_vec)
    }

    /// Python's `starmap`: each item is a tuple whose fields fill the target's parameters
    /// (`add(a, b)` over `(a, b)` pairs). In Rust this is [`map`](Self::map) itself — the
    /// target's arity decides how an item is passed — kept under Python's name.
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    pub fn starmap<F, A, M, I>(&self, f: F, items: I) -> Result<Vec<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A>,
    {
        self.map(f, items)
    }

    /// [`starmap`](Self::starmap), returning at once with an [`AsyncResult`].
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    pub fn starmap_async<F, A, M, I>(&self, f: F, items: I) -> Result<AsyncResult<Vec<F::Output>>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A>,
    {
        self.map_async(f, items)
    }

    /// Runs `f(args)` in a worker and waits for the value (Python's `apply`).
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    pub fn apply<F, A, M>(&self, f: F, args: A) -> Result<F::Output>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
    {
        self.apply_async(f, args)?.get()
    }

    /// Runs `f(args)` in a worker; returns at once with an [`AsyncResult`], which can be
    /// waited for, polled, cancelled, or `.await`ed.
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    pub fn apply_async<F, A, M>(&self, f: F, args: A) -> Result<AsyncResult<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
    {
        std::mem::forget(f);
        self.collect_async_with::<F, A, M, _, _>(
            [args],
            Some(1),
            finish_one,
            TaskOptions::default(),
            call_span("apply", None),
        )
    }

    fn stream<F, A, M, I>(
        &self,
        items: I,
        chunksize: usize,
        ordered: bool,
    ) -> Result<IMap<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A> + 'static,
        I::IntoIter: Send + 'static,
    {
        let chunksize = chunksize.max(1);
        let stream = Stream::new(ordered);
        // A few chunks per worker; with chunk size 1 (each item its own message) room for
        // every worker's pipeline (the dispatcher's PIPELINE_DEPTH) with as much again on
        // the way to the consumer.
        let per_worker = if chunksize == 1 {
            2 * dispatcher::PIPELINE_DEPTH as u64
        } else {
            4 * chunksize as u64
        };
        let window = (self.processes as u64 * per_worker).max(16);
        let consumed = stream.consumed.clone();
        let entry = task::chunk_entry::<F, A, M>();
        let sink = StreamSink {
            stream: stream.clone(),
            batch: Vec::new(),
        };
        let source = IterSource::new(items.into_iter().map(AsBorrowed::<_, A>::new));
        let span = call_span(if ordered { "imap" } else { "imap_unordered" }, None);
        let id = self.submit(Job {
            id: 0,
            entry,
            chunksize,
            source: Box::new(source),
            sink: Box::new(sink),
            window: Some((window, consumed.clone())),
            len: None,
            opts: TaskOptions::default(),
            span,
        })?;
        let shared = Arc::downgrade(&self.shared);
        let half = (window / 2).max(1);
        // Called after each item the consumer takes: wake the dispatcher once per half
        // window, so that it pulls more input.
        let wake = Box::new(move || {
            if consumed.load(Ordering::SeqCst) % half == 0 {
                if let Some(s) = shared.upgrade() {
                    s.poke();
                }
            }
        });
        Ok(IMap::new(stream, wake, self.canceller(id)))
    }

    /// A lazy iterator over the results, in item order (Python's `imap`). The input is
    /// pulled only as workers need it, so it may be endless (`0..`): memory stays bounded
    /// by a window of a few chunks per worker (128 items per worker at chunk size 1). Chunk size 1; see
    /// [`imap_chunked`](Self::imap_chunked).
    ///
    /// ```
    /// use multiprocess::Pool;
    /// fn cube(x: u64) -> u64 { x * x * x }
    /// let pool = Pool::new(2)?;
    /// let first: Vec<u64> = pool.imap(cube, 0..)?.take(4).collect::<Result<_, _>>()?;
    /// assert_eq!(first, [0, 1, 8, 27]);
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    pub fn imap<F, A, M, I>(&self, f: F, items: I) -> Result<IMap<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A> + 'static,
        I::IntoIter: Send + 'static,
    {
        std::mem::forget(f);
        self.stream::<F, A, M, I>(items, 1, true)
    }

    /// [`imap`](Self::imap) with an explicit chunk size.
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    #[doc(alias = "imap")]
    pub fn imap_chunked<F, A, M, I>(
        &self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Result<IMap<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A> + 'static,
        I::IntoIter: Send + 'static,
    {
        std::mem::forget(f);
        self.stream::<F, A, M, I>(items, chunksize, true)
    }

    /// Like [`imap`](Self::imap), but results come as soon as they are ready, in any
    /// order (Python's `imap_unordered`).
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    pub fn imap_unordered<F, A, M, I>(&self, f: F, items: I) -> Result<IMap<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A> + 'static,
        I::IntoIter: Send + 'static,
    {
        std::mem::forget(f);
        self.stream::<F, A, M, I>(items, 1, false)
    }

    /// [`imap_unordered`](Self::imap_unordered) with an explicit chunk size.
    ///
    /// # Errors
    /// The first failure in item order ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …) for blocking calls, or [`Error::Process`] if the pool takes
    /// no more work (closed, terminated, broken); [`Error::Serialization`] for args that
    /// cannot be encoded.
    #[doc(alias = "imap_unordered")]
    pub fn imap_unordered_chunked<F, A, M, I>(
        &self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Result<IMap<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator,
        I::Item: Borrow<A> + 'static,
        I::IntoIter: Send + 'static,
    {
        std::mem::forget(f);
        self.stream::<F, A, M, I>(items, chunksize, false)
    }

    /// No more work may be submitted; the workers exit once the queued work is done
    /// (Python's `close`).
    pub fn close(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if !*closed {
            *closed = true;
            self.shared.send(Command::Close);
        }
    }

    /// Stops every worker now, even mid-task (Python's `terminate`); unfinished calls fail
    /// with [`Error::Cancelled`]. Returns once the workers are gone.
    pub fn terminate(&self) {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.send(Command::Terminate);
        let _ = self.join_inner();
    }

    /// Waits for the workers to exit; call [`close`](Self::close) or
    /// [`terminate`](Self::terminate) first (Python's `join`).
    ///
    /// # Errors
    /// [`Error::Process`] if the pool was neither closed nor terminated first.
    pub fn join(&self) -> Result<()> {
        if !*self.closed.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(Error::process("join() needs close() or terminate() first"));
        }
        self.join_inner()
    }

    fn join_inner(&self) -> Result<()> {
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            t.join()
                .map_err(|_| Error::process("the pool's dispatcher thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            self.terminate();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("processes", &self.processes)
            .finish_non_exhaustive()
    }
}
