//! The MPI backend of [`Pool`](crate::Pool) (feature `mpi`): the same program, the
//! same `Pool` calls, run across the hosts of an MPI job.
//!
//! ```text
//! cargo build --release --features mpi --example mpi_primes
//! mpirun -n 4 --host node1:2,node2:1,node3:1 --bind-to none target/release/examples/mpi_primes
//! srun -N 3 --ntasks-per-node=1 --mpi=pmix target/release/examples/mpi_primes
//! ```
//!
//! # How it works
//! * **Roles before `main`.** A program built with the feature looks at its environment
//!   before `main` runs: `OMPI_COMM_WORLD_SIZE` (Open MPI's `mpirun`), `PMIX_RANK`
//!   (PMIx launchers, `srun --mpi=pmix`) or `PMI_SIZE` (PMI-2, MPICH's `mpiexec`,
//!   `srun --mpi=pmi2`) mean an MPI launch (`SLURM_*` variables alone do not: a batch
//!   script is not a launch). Then MPI is initialized there; **rank 0 runs `main`**, and
//!   **every other rank becomes an agent**: it never runs `main`, it serves rank 0.
//!   Without those variables nothing changes at all.
//! * **Same build everywhere.** Each agent sends rank 0 its build id; an agent that
//!   runs another build is refused (it prints why and exits with status 1) and
//!   `Pool` construction on rank 0 fails with [`Error::OnHost`] wrapping
//!   [`Error::ImageMismatch`]: targets are code offsets, valid only in the same build.
//! * **Crashes stay on their host.** An agent runs each task in a local pool of worker
//!   processes (the ordinary local [`Pool`](crate::Pool), with the call's timeout,
//!   retries, memory limit, initializer and `maxtasksperchild`). A task that panics,
//!   aborts, segfaults or overruns kills at most a local worker; the call gets
//!   [`Error::OnHost`] `{ host, rank, error }` around the usual
//!   [`Error::Panicked`]/[`Error::WorkerDied`]/[`Error::Timeout`], whose `task` is the
//!   item's index in the call. [`Error::local`] strips the wrapper.
//! * **Same protocol.** Chunks travel to an agent exactly as the local pool sends them
//!   to a worker, and the agent hands them to its local pool unchanged; results come
//!   back as the worker encoded them. `map`, `imap`, `imap_unordered`, `starmap`,
//!   `apply_async`, chunk sizes, ordered results and cancelling behave as locally.
//!
//! # Choosing local or MPI, and how many workers
//! Under an MPI launch with at least two ranks, [`Pool::new`](crate::Pool::new) and
//! [`Pool::builder`](crate::Pool::builder) use the agents
//! ([`Backend::Auto`]); `.backend(Backend::Local)` keeps a pool on
//! rank 0's machine, `.backend(Backend::Mpi)` insists on MPI (an error when not
//! launched). Each agent runs `MULTIPROCESS_MPI_WORKERS` workers if that variable is set
//! on its rank, else its host's CPU count divided by the number of agents on that host
//! (at least 1). The pool's size is the sum; `.processes(n)` with `n > 0` asks for `n`
//! workers in all, spread evenly over the agents.
//!
//! # When things go wrong
//! * A panic in an agent's own code (not in a task) prints the panic and calls
//!   `MPI_Abort`: the job ends instead of hanging.
//! * A whole host or agent dying (killed, machine lost) is seen by the MPI runtime,
//!   which ends the job: `mpirun` prints which rank died and on which node, and exits
//!   non-zero. MPI (without fault-tolerance extensions) cannot go on without a rank.
//! * When rank 0's `main` returns, panics or calls `exit`, the agents are told to stop
//!   and MPI is finalized on every rank (an `atexit` handler).
//!
//! # Security
//! MPI traffic is neither authenticated nor encrypted: whoever can reach the job's ports
//! can make it run code. Run MPI jobs on trusted cluster networks only.
//!
//! # Notes
//! * This crate initializes MPI (thread level `Multiple`, at least `Serialized` needed)
//!   before `main` and finalizes it at exit: do not call `MPI_Init`/`MPI_Finalize`
//!   yourself. Rank 0 and the agents poll MPI (it has nothing to wait on): every 50 µs
//!   for a few milliseconds after news, then every millisecond, and every 10 ms after
//!   about a second of quiet.
//! * Agents send with non-blocking sends, so that rank 0 and an agent sending each other
//!   large messages at the same moment never wait for each other.
//!
//! Progress bars ([`PoolBuilder::progress`](crate::PoolBuilder::progress)) are not drawn
//! for MPI pools; [`Pool::stats`](crate::Pool::stats) lists one entry per agent.

mod agent;
mod dispatcher;
mod sends;
mod wire;

use crate::error::{Error, Result};
use crate::pool::dispatcher::{Config, Shared};
use crate::pool::Backend;
use crate::sys::{image, process as sysproc};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use wire::{Control, Hello, TAG_CONTROL, TAG_HELLO};

/// How long rank 0 waits for the agents to introduce themselves.
const HELLO_WAIT: Duration = Duration::from_secs(120);

/// How long to sleep between polls of MPI after `idle` rounds without news: MPI has no
/// descriptor to wait on, so both sides poll — every 50 µs for the first few milliseconds
/// after news (a chunk's results usually follow within them), then every millisecond,
/// and every 10 ms after about a second of quiet.
pub(crate) fn idle_nap(idle: u32) -> Duration {
    match idle {
        0..=255 => Duration::from_micros(50),
        256..=1_255 => Duration::from_millis(1),
        _ => Duration::from_millis(10),
    }
}

/// One agent rank of the job, as it introduced itself to rank 0 ([`agents`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentInfo {
    /// Its MPI rank (1, 2, …).
    pub rank: i32,
    /// Its host name.
    pub host: String,
    /// Its process id on that host.
    pub pid: u32,
    /// The CPUs it may use.
    pub cpus: u32,
    /// How many workers it runs for a pool that does not say otherwise.
    pub workers: u32,
}

struct Launch {
    rank: i32,
    size: i32,
    pid: u32,
    threading: Threading,
}

static LAUNCH: OnceLock<Launch> = OnceLock::new();

/// Rank 0's MPI state. Every MPI call on rank 0 happens with this lock held.
pub(crate) struct Link {
    universe: Option<Universe>,
    registry: Option<std::result::Result<Vec<AgentInfo>, Refusal>>,
    refused: Vec<i32>,
}

#[derive(Clone, Debug)]
enum Refusal {
    Mismatch {
        rank: i32,
        host: String,
        parent: String,
        child: String,
    },
    Other(String),
}

impl Refusal {
    fn error(&self) -> Error {
        match self.clone() {
            Refusal::Mismatch {
                rank,
                host,
                parent,
                child,
            } => Error::OnHost {
                host,
                rank,
                error: Box::new(Error::ImageMismatch { parent, child }),
            },
            Refusal::Other(why) => Error::process(why),
        }
    }
}

static LINK: Mutex<Option<Link>> = Mutex::new(None);

fn lock_link() -> MutexGuard<'static, Option<Link>> {
    LINK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` with MPI usable on rank 0; an error once MPI has been finalized.
pub(crate) fn with_link<R>(f: impl FnOnce(&mut Link, &SimpleCommunicator) -> R) -> Result<R> {
    let mut g = lock_link();
    match g.as_mut() {
        Some(link) if link.universe.is_some() => {
            let world = SimpleCommunicator::world();
            Ok(f(link, &world))
        }
        _ => Err(Error::process(
            "MPI is not running on this rank any more (finalized at exit)",
        )),
    }
}

thread_local! {
    /// The agent whose results this thread is decoding (rank 0's MPI dispatcher).
    static RELAYING: std::cell::RefCell<Option<(String, i32)>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (which decodes an agent's results) so that task failures decoded in it name
/// that agent's host and rank.
pub(crate) fn relaying<R>(host: &str, rank: i32, f: impl FnOnce() -> R) -> R {
    RELAYING.with(|r| *r.borrow_mut() = Some((host.to_string(), rank)));
    let out = f();
    RELAYING.with(|r| *r.borrow_mut() = None);
    out
}

/// The hook in `pool::task`'s decoding of task failures: wraps `e` in [`Error::OnHost`]
/// while results relayed from an agent are decoded.
pub(crate) fn tag_remote(e: Error) -> Error {
    RELAYING.with(|r| match &*r.borrow() {
        Some((host, rank)) => Error::OnHost {
            host: host.clone(),
            rank: *rank,
            error: Box::new(e),
        },
        None => e,
    })
}

/// Whether the environment says an MPI launcher started this process.
pub(crate) fn launched_by_env() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Called before `main` by `bootstrap` under an MPI launch ([`launched_by_env`]):
/// initializes MPI; ranks other than 0 become agents and never return.
pub(crate) fn enter_launch() {
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
        return;
    };
    let world = universe.world();
    let (rank, size) = (world.rank(), world.size());
    let pid = sysproc::getpid();
    let _ = LAUNCH.set(Launch {
        rank,
        size,
        pid,
        threading,
    });
    if rank != 0 {
        agent::agent_main(universe, rank);
    }
    *lock_link() = Some(Link {
        universe: Some(universe),
        registry: None,
        refused: Vec::new(),
    });
    sysproc::at_exit(finish_at_exit);
}

/// Rank 0, at exit: tell the agents to stop, then finalize MPI.
extern "C" fn finish_at_exit() {
    let Some(launch) = LAUNCH.get() else {
        return;
    };
    if sysproc::getpid() != launch.pid {
        return;
    }
    let mut g = lock_link();
    let Some(link) = g.as_mut() else {
        return;
    };
    if link.universe.is_none() {
        return;
    }
    let world = SimpleCommunicator::world();
    let _ = register(link, &world);
    let bye = wire::encode(&Control::Shutdown).unwrap_or_default();
    for r in 1..launch.size {
        if !link.refused.contains(&r) {
            world
                .process_at_rank(r)
                .send_with_tag(&bye[..], TAG_CONTROL);
        }
    }
    // MPI_Finalize.
    drop(link.universe.take());
}

/// Collects the agents' introductions (once) and refuses those of another build.
fn register<'a>(link: &'a mut Link, world: &SimpleCommunicator) -> Result<&'a [AgentInfo]> {
    if link.registry.is_none() {
        link.registry = Some(collect_hellos(link, world));
    }
    match link.registry.as_ref().expect("just set") {
        Ok(agents) => Ok(agents),
        Err(r) => Err(r.error()),
    }
}

fn collect_hellos(
    link: &mut Link,
    world: &SimpleCommunicator,
) -> std::result::Result<Vec<AgentInfo>, Refusal> {
    let size = world.size();
    let mut hellos: Vec<Option<Hello>> = vec![None; size as usize];
    let mut missing = (size - 1) as usize;
    let deadline = Instant::now() + HELLO_WAIT;
    while missing > 0 {
        match world
            .any_process()
            .immediate_matched_probe_with_tag(TAG_HELLO)
        {
            Some(probed) => {
                let (bytes, status) = probed.matched_receive_vec::<u8>();
                let r = status.source_rank();
                match wire::decode::<Hello>(&bytes) {
                    Ok(h) if r > 0 && r < size && hellos[r as usize].is_none() => {
                        hellos[r as usize] = Some(h);
                        missing -= 1;
                    }
                    _ => {
                        return Err(Refusal::Other(format!(
                            "a malformed introduction from MPI rank {r}"
                        )))
                    }
                }
            }
            None if Instant::now() > deadline => {
                let late: Vec<String> = (1..size)
                    .filter(|r| hellos[*r as usize].is_none())
                    .map(|r| r.to_string())
                    .collect();
                return Err(Refusal::Other(format!(
                    "MPI ranks {} did not report within {} s",
                    late.join(", "),
                    HELLO_WAIT.as_secs()
                )));
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    let ours = image::build_id();
    let mut first_refusal = None;
    let mut agents = Vec::new();
    let mut per_host = std::collections::HashMap::<String, u32>::new();
    for h in hellos.iter().flatten() {
        *per_host.entry(h.host.clone()).or_default() += 1;
    }
    for (r, h) in hellos.into_iter().enumerate() {
        let Some(h) = h else { continue };
        let rank = r as i32;
        if h.build_id != ours {
            let (parent, child) = (image::hex(ours), image::hex(&h.build_id));
            let why = format!(
                "refusing to serve: rank 0 runs build {parent}, this rank (on {}) runs build {child}",
                h.host
            );
            if let Ok(msg) = wire::encode(&Control::Refuse { why }) {
                world
                    .process_at_rank(rank)
                    .send_with_tag(&msg[..], TAG_CONTROL);
            }
            link.refused.push(rank);
            first_refusal.get_or_insert(Refusal::Mismatch {
                rank,
                host: h.host.clone(),
                parent,
                child,
            });
            continue;
        }
        let sharing = per_host.get(&h.host).copied().unwrap_or(1).max(1);
        let workers = h.workers.unwrap_or((h.cpus / sharing).max(1)).max(1);
        agents.push(AgentInfo {
            rank,
            host: h.host,
            pid: h.pid,
            cpus: h.cpus,
            workers,
        });
    }
    match first_refusal {
        Some(r) => Err(r),
        None => Ok(agents),
    }
}

/// Whether this process was started by an MPI launcher (and MPI is initialized here).
///
/// ```
/// // Under plain `cargo test` there is no launcher.
/// assert!(!multiprocess::mpi::is_launched());
/// ```
pub fn is_launched() -> bool {
    LAUNCH.get().is_some()
}

/// This process's MPI rank (always 0 where user code runs: the other ranks are agents),
/// or `None` without an MPI launch.
pub fn rank() -> Option<i32> {
    LAUNCH.get().map(|l| l.rank)
}

/// The number of ranks in the job (rank 0 and the agents), or `None` without an MPI
/// launch.
pub fn world_size() -> Option<i32> {
    LAUNCH.get().map(|l| l.size)
}

/// The agents of this job, in rank order (waits for them to introduce themselves, at
/// most two minutes). Fails without an MPI launch, or with [`Error::OnHost`] wrapping
/// [`Error::ImageMismatch`] when an agent runs another build.
///
/// # Errors
/// [`Error::InvalidArgument`] without an MPI launch; [`Error::OnHost`] wrapping
/// [`Error::ImageMismatch`] when an agent runs another build.
pub fn agents() -> Result<Vec<AgentInfo>> {
    if !is_launched() {
        return Err(Error::InvalidArgument(
            "this program was not started by an MPI launcher".into(),
        ));
    }
    with_link(|link, world| register(link, world).map(<[AgentInfo]>::to_vec))?
}

/// The MPI hook of [`PoolBuilder::build`](crate::PoolBuilder::build): `None` for a local
/// pool, else the pool's size and the body of its dispatcher thread.
#[allow(clippy::type_complexity)]
pub(crate) fn pool_dispatcher(
    backend: Backend,
    asked: usize,
    cfg: &Config,
    shared: &Arc<Shared>,
) -> Result<Option<(usize, Box<dyn FnOnce() + Send>)>> {
    let launch = LAUNCH.get();
    match backend {
        Backend::Local => return Ok(None),
        Backend::Mpi if launch.is_none() => {
            return Err(Error::InvalidArgument(
                "Backend::Mpi: this program was not started by an MPI launcher".into(),
            ))
        }
        Backend::Mpi if launch.is_some_and(|l| l.size < 2) => {
            return Err(Error::InvalidArgument(
                "Backend::Mpi: the MPI job has no other rank to run workers (start it with -n 2 or more)".into(),
            ))
        }
        _ if launch.is_none_or(|l| l.size < 2) => return Ok(None),
        _ => {}
    }
    let launch = launch.expect("checked");
    if launch.threading < Threading::Serialized {
        return Err(Error::process(format!(
            "the MPI library gives thread level {:?}; an MPI pool needs Serialized or Multiple",
            launch.threading
        )));
    }
    dispatcher::start(asked, cfg, shared).map(Some)
}
