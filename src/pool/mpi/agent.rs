//! An agent: a rank other than 0. It never runs `main`; it runs the chunks rank 0 sends
//! in local pools of worker processes, and sends the results back.

use super::sends::Sends;
use super::wire::{self, Control, Hello, PoolSpec, WireError, TAG_CONTROL, TAG_HELLO};
use crate::error::{Error, Result};
use crate::pool::dispatcher::Source;
use crate::pool::result::Sink;
use crate::pool::task::ChunkView;
use crate::pool::{Backend, Pool};
use crate::sys::fd::{eventfd, eventfd_drain, eventfd_signal, poll_readable};
use crate::sys::{image, process as sysproc};
use mpi::environment::Universe;
use mpi::point_to_point::Source as _;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// `[tag u8][seq u64][entry i64]`: the prefix of a chunk message (as `pool::task`).
const CHUNK_PREFIX: usize = 17;

/// How many idle rounds an agent yields before it sleeps between polls.
const SPIN_ROUNDS: u32 = 64;

enum Out {
    Send(i32, Vec<u8>),
    Done(u64, u64),
}

/// What the local pools' dispatcher threads hand to the agent's loop.
struct Outbox {
    queue: Mutex<VecDeque<Out>>,
    wake: OwnedFd,
}

impl Outbox {
    fn push(&self, o: Out) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(o);
        eventfd_signal(self.wake.as_fd());
    }

    fn take(&self) -> VecDeque<Out> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// One chunk frame, as received: the local pool's whole input for one job.
struct OneFrame(Option<(u64, Vec<u8>)>);

impl Source for OneFrame {
    fn next_chunk(&mut self, _max: usize, _spare: Vec<u8>) -> Option<(u64, Result<Vec<u8>>)> {
        self.0.take().map(|(n, f)| (n, Ok(f)))
    }
}

/// Forwards what the local pool reports for one chunk to rank 0.
struct AgentSink {
    pool: u64,
    seq: u64,
    tag: i32,
    outbox: Arc<Outbox>,
    ended: bool,
}

impl AgentSink {
    fn send_error(&self, kind: u8, index: u64, e: &Error) {
        let body = wire::encode(&WireError::from_error(e)).unwrap_or_default();
        let mut m = wire::header(kind, self.seq, index, body.len());
        m.extend_from_slice(&body);
        self.outbox.push(Out::Send(self.tag, m));
    }
}

impl Sink for AgentSink {
    fn deliver(&mut self, start: u64, results: &[u8]) -> Result<u64> {
        let (n, _) = crate::reduction::decode_from::<u64>(results)?;
        let mut m = wire::header(wire::RESULTS, self.seq, start, results.len());
        m.extend_from_slice(results);
        self.outbox.push(Out::Send(self.tag, m));
        Ok(n)
    }

    fn fail(&mut self, index: u64, error: Error) {
        self.send_error(wire::FAIL, index, &error);
    }

    fn finish(&mut self) {
        self.ended = true;
        self.outbox.push(Out::Done(self.pool, self.seq));
    }

    fn abort(&mut self, error: Error) {
        if !self.ended {
            self.ended = true;
            self.send_error(wire::ABORT, 0, &error);
            self.outbox.push(Out::Done(self.pool, self.seq));
        }
    }
}

impl Drop for AgentSink {
    fn drop(&mut self) {
        self.abort(Error::Cancelled);
    }
}

struct LocalPool {
    pool: Pool,
    tag: i32,
    /// Rank 0's chunk seq → the local job running it.
    jobs: HashMap<u64, u64>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| mpi::environment::processor_name().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// A panic in the agent's own code (not in a task: those run in worker processes) ends
/// the whole job with a message, rather than leaving rank 0 waiting for ever.
fn abort_on_panic(rank: i32, host: String) {
    let me = sysproc::getpid();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if sysproc::getpid() != me {
            return previous(info);
        }
        eprintln!(
            "multiprocess: the MPI agent of rank {rank} on {host} panicked: {info}\n\
             multiprocess: aborting the MPI job"
        );
        SimpleCommunicator::world().abort(70);
    }));
}

fn open(spec: &PoolSpec) -> Result<Pool> {
    let mut b = Pool::builder()
        .backend(Backend::Local)
        .processes(spec.workers.max(1) as usize)
        .grace(spec.grace)
        .retries(spec.retries)
        .start_method(spec.method.parse()?)
        .raw_initializer(spec.init.clone());
    if let Some(n) = spec.max_tasks {
        b = b.maxtasksperchild(n);
    }
    if let Some(t) = spec.timeout {
        b = b.timeout(t);
    }
    if let Some(m) = spec.memory_limit {
        b = b.memory_limit(m);
    }
    b.build()
}

/// The agent's whole life: introduce itself, serve rank 0 until told to stop, finalize
/// MPI, exit.
pub(crate) fn agent_main(universe: Universe, rank: i32) -> ! {
    let world = universe.world();
    let host = hostname();
    abort_on_panic(rank, host.clone());
    let code = serve(&world, rank, host);
    // MPI_Finalize.
    drop(universe);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    sysproc::exit_now(code)
}

fn serve(world: &SimpleCommunicator, rank: i32, host: String) -> i32 {
    let mut sends = Sends::new();
    let hello = Hello {
        build_id: image::build_id().to_vec(),
        host: host.clone(),
        pid: sysproc::getpid(),
        cpus: crate::process::cpu_count() as u32,
        workers: std::env::var("MULTIPROCESS_MPI_WORKERS")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    };
    sends.send(
        world,
        0,
        TAG_HELLO,
        wire::encode(&hello).expect("a hello encodes"),
    );
    let outbox = Arc::new(Outbox {
        queue: Mutex::new(VecDeque::new()),
        wake: eventfd().expect("an eventfd for the agent"),
    });
    let mut pools: HashMap<u64, LocalPool> = HashMap::new();
    let mut by_tag: HashMap<i32, u64> = HashMap::new();
    let mut idle = 0u32;
    let code = 'serve: loop {
        let mut busy = false;
        while let Some(probed) = world.any_process().immediate_matched_probe() {
            let (bytes, status) = probed.matched_receive_vec::<u8>();
            busy = true;
            let tag = status.tag();
            if tag == TAG_CONTROL {
                let control = match wire::decode::<Control>(&bytes) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("multiprocess: MPI agent {rank} on {host}: bad control message from rank 0: {e}");
                        continue;
                    }
                };
                match control {
                    Control::Open { pool, spec } => {
                        let tag = wire::pool_tag(pool);
                        let opened = open(&spec);
                        let reply: std::result::Result<u32, String> = match &opened {
                            Ok(_) => Ok(spec.workers),
                            Err(e) => Err(e.to_string()),
                        };
                        let body = wire::encode(&reply).unwrap_or_default();
                        let mut m = wire::header(wire::OPENED, 0, 0, body.len());
                        m.extend_from_slice(&body);
                        sends.send(world, 0, tag, m);
                        if let Ok(p) = opened {
                            by_tag.insert(tag, pool);
                            pools.insert(
                                pool,
                                LocalPool {
                                    pool: p,
                                    tag,
                                    jobs: HashMap::new(),
                                },
                            );
                        }
                    }
                    Control::Cancel { pool, seq } => {
                        if let Some(p) = pools.get(&pool) {
                            if let Some(job) = p.jobs.get(&seq) {
                                p.pool.cancel_raw(*job);
                            }
                        }
                    }
                    Control::Close { pool } => {
                        let tag = wire::pool_tag(pool);
                        if let Some(p) = pools.remove(&pool) {
                            by_tag.remove(&p.tag);
                            p.pool.terminate();
                            drop(p);
                            forward(&outbox, world, &mut sends, &mut pools);
                        }
                        // Also when the pool never opened here: rank 0 waits for this.
                        sends.send(world, 0, tag, wire::header(wire::CLOSED, 0, 0, 0));
                    }
                    Control::Refuse { why } => {
                        eprintln!("multiprocess: MPI rank {rank} on {host}: {why}");
                        break 'serve 1;
                    }
                    Control::Shutdown => break 'serve 0,
                }
            } else if let Some(pool) = by_tag.get(&tag).copied() {
                run_chunk(&mut pools, pool, bytes, &outbox, world, &mut sends);
            }
        }
        if forward(&outbox, world, &mut sends, &mut pools) {
            busy = true;
        }
        sends.progress();
        if busy {
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            if idle < SPIN_ROUNDS {
                std::thread::yield_now();
            } else {
                let nap = super::idle_nap(idle);
                let _ = poll_readable(&[outbox.wake.as_fd()], Some(nap));
                eventfd_drain(outbox.wake.as_fd());
            }
        }
    };
    for (_, p) in pools.drain() {
        p.pool.terminate();
    }
    sends.progress();
    sends.abandon();
    code
}

/// Sends what the local pools produced; true if there was anything.
fn forward(
    outbox: &Outbox,
    world: &SimpleCommunicator,
    sends: &mut Sends,
    pools: &mut HashMap<u64, LocalPool>,
) -> bool {
    let out = outbox.take();
    let any = !out.is_empty();
    for o in out {
        match o {
            Out::Send(tag, m) => sends.send(world, 0, tag, m),
            Out::Done(pool, seq) => {
                if let Some(p) = pools.get_mut(&pool) {
                    p.jobs.remove(&seq);
                }
            }
        }
    }
    any
}

fn run_chunk(
    pools: &mut HashMap<u64, LocalPool>,
    pool: u64,
    msg: Vec<u8>,
    outbox: &Arc<Outbox>,
    world: &SimpleCommunicator,
    sends: &mut Sends,
) {
    let Some(p) = pools.get_mut(&pool) else {
        return;
    };
    let fail = |sends: &mut Sends, seq: u64, e: Error| {
        let body = wire::encode(&WireError::from_error(&e)).unwrap_or_default();
        let mut m = wire::header(wire::ABORT, seq, 0, body.len());
        m.extend_from_slice(&body);
        sends.send(world, 0, p.tag, m);
    };
    if msg.len() < CHUNK_PREFIX {
        return fail(sends, 0, Error::protocol("short chunk message from rank 0"));
    }
    let seq = u64::from_le_bytes(msg[1..9].try_into().expect("8 bytes"));
    let entry = i64::from_le_bytes(msg[9..17].try_into().expect("8 bytes"));
    let count = match ChunkView::parse(&msg[CHUNK_PREFIX..]) {
        Ok(v) => v.len() as u64,
        Err(e) => return fail(sends, seq, e),
    };
    let sink = AgentSink {
        pool,
        seq,
        tag: p.tag,
        outbox: outbox.clone(),
        ended: false,
    };
    // On an error the sink is dropped with the job, and reports the chunk as failed.
    if let Ok(job) = p.pool.submit_raw(
        entry,
        count,
        Box::new(OneFrame(Some((count, msg)))),
        Box::new(sink),
    ) {
        p.jobs.insert(seq, job);
    }
}
