//! Rank 0's side of an MPI pool: the pool's dispatcher thread, which pulls chunks from
//! the same jobs as the local dispatcher and deals them to the agents instead of to
//! local workers.

use super::wire::{self, Control, PoolSpec, WireError, TAG_CONTROL};
use super::{register, with_link, AgentInfo};
use crate::error::{Error, Result};
use crate::pool::dispatcher::{Config, Shared};
use crate::pool::jobs::JobTable;
use crate::pool::result::result_count;
use crate::pool::task::set_chunk_prefix;
use crate::pool::WorkerStats;
use crate::sys::fd::{eventfd_drain, poll_readable};
use mpi::traits::*;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

static NEXT_POOL: AtomicU64 = AtomicU64::new(1);

/// How long rank 0 waits for the agents to start or stop a pool's workers.
const OPEN_WAIT: Duration = Duration::from_secs(120);
/// How many idle rounds the dispatcher yields before it sleeps between polls.
const SPIN_ROUNDS: u32 = 64;

fn lock<T>(m: &std::sync::Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A chunk on its way or at an agent.
struct InFlight {
    job: u64,
    start: u64,
    count: u64,
    /// Which of its items have been accounted for.
    done: Vec<bool>,
    left: u64,
    sent: Instant,
}

struct Agent {
    info: AgentInfo,
    workers: usize,
    inflight: HashMap<u64, InFlight>,
    stats: usize,
}

pub(crate) struct MpiDispatcher {
    pool: u64,
    tag: i32,
    shared: Arc<Shared>,
    agents: Vec<Agent>,
    jobs: JobTable,
    /// Chunks pulled but not yet sent.
    queue: VecDeque<(u64, u64, u64, i64, Vec<u8>)>,
    seq: u64,
    closed: bool,
    terminating: bool,
    broken: Option<String>,
}

/// How many workers each agent runs: `asked` in all (spread evenly), or each one's own
/// number when `asked` is 0.
fn split(asked: usize, agents: &[AgentInfo]) -> Vec<usize> {
    if asked == 0 {
        return agents.iter().map(|a| a.workers as usize).collect();
    }
    let k = agents.len();
    (0..k)
        .map(|i| asked / k + usize::from(i < asked % k))
        .collect()
}

/// Opens the pool on the agents; returns its size and the dispatcher thread's body.
#[allow(clippy::type_complexity)]
pub(crate) fn start(
    asked: usize,
    cfg: &Config,
    shared: &Arc<Shared>,
) -> Result<(usize, Box<dyn FnOnce() + Send>)> {
    let agents = with_link(|link, world| register(link, world).map(<[AgentInfo]>::to_vec))??;
    if agents.is_empty() {
        return Err(Error::process("the MPI job has no agent ranks"));
    }
    let counts = split(asked, &agents);
    let pool = NEXT_POOL.fetch_add(1, Ordering::Relaxed);
    let tag = wire::pool_tag(pool);
    let mut opened = Vec::new();
    with_link(|_, world| -> Result<()> {
        for (a, &n) in agents.iter().zip(&counts) {
            if n == 0 {
                continue;
            }
            let spec = PoolSpec {
                workers: n as u32,
                max_tasks: cfg.max_tasks,
                init: cfg.init.clone(),
                method: cfg.method.to_string(),
                timeout: cfg.timeout,
                grace: cfg.grace,
                retries: cfg.retries,
                memory_limit: cfg.memory_limit,
            };
            let msg = wire::encode(&Control::Open { pool, spec })?;
            world
                .process_at_rank(a.rank)
                .send_with_tag(&msg[..], TAG_CONTROL);
            opened.push(a.rank);
        }
        Ok(())
    })??;
    // Wait for every agent to say whether its workers started.
    let mut waiting: Vec<i32> = opened.clone();
    let mut failure = None;
    let deadline = Instant::now() + OPEN_WAIT;
    while !waiting.is_empty() {
        let got = receive(tag, 64)?;
        if got.is_empty() {
            if Instant::now() > deadline {
                failure.get_or_insert(Error::process(format!(
                    "MPI ranks {waiting:?} did not start their workers within {} s",
                    OPEN_WAIT.as_secs()
                )));
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for (rank, msg) in got {
            let Ok((wire::OPENED, _, _, body)) = wire::parse_header(&msg) else {
                continue;
            };
            waiting.retain(|r| *r != rank);
            match wire::decode::<std::result::Result<u32, String>>(body) {
                Ok(Ok(_)) => {}
                Ok(Err(why)) => {
                    let host = agents
                        .iter()
                        .find(|a| a.rank == rank)
                        .map(|a| a.host.clone())
                        .unwrap_or_default();
                    failure.get_or_insert(Error::OnHost {
                        host,
                        rank,
                        error: Box::new(Error::process(why)),
                    });
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
    }
    if let Some(e) = failure {
        close_on_agents(pool, tag, &opened);
        return Err(e);
    }
    let mut list = Vec::new();
    {
        let mut stats = lock(&shared.stats);
        for (a, &n) in agents.into_iter().zip(&counts) {
            if n == 0 {
                continue;
            }
            stats.workers.push(WorkerStats {
                name: format!("rank {} on {} ({n} workers)", a.rank, a.host),
                pid: a.pid,
                alive: true,
                ..WorkerStats::default()
            });
            list.push(Agent {
                info: a,
                workers: n,
                inflight: HashMap::new(),
                stats: stats.workers.len() - 1,
            });
        }
    }
    let total = list.iter().map(|a| a.workers).sum();
    let d = MpiDispatcher {
        pool,
        tag,
        shared: shared.clone(),
        agents: list,
        jobs: JobTable::new(false),
        queue: VecDeque::new(),
        seq: 0,
        closed: false,
        terminating: false,
        broken: None,
    };
    Ok((total, Box::new(move || d.run())))
}

/// Up to `max` messages waiting on `tag`, with their senders.
fn receive(tag: i32, max: usize) -> Result<Vec<(i32, Vec<u8>)>> {
    with_link(|_, world| {
        let mut got = Vec::new();
        while got.len() < max {
            let Some(probed) = world.any_process().immediate_matched_probe_with_tag(tag) else {
                break;
            };
            let (bytes, status) = probed.matched_receive_vec::<u8>();
            got.push((status.source_rank(), bytes));
        }
        got
    })
}

/// Tells the agents to stop the pool's workers and waits (bounded) for each to confirm,
/// dropping whatever results were still on their way.
fn close_on_agents(pool: u64, tag: i32, ranks: &[i32]) {
    let Ok(msg) = wire::encode(&Control::Close { pool }) else {
        return;
    };
    let sent = with_link(|_, world| {
        for &r in ranks {
            world
                .process_at_rank(r)
                .send_with_tag(&msg[..], TAG_CONTROL);
        }
    });
    if sent.is_err() {
        return;
    }
    let mut waiting = ranks.to_vec();
    let deadline = Instant::now() + OPEN_WAIT;
    while !waiting.is_empty() && Instant::now() < deadline {
        match receive(tag, 256) {
            Ok(got) if got.is_empty() => std::thread::sleep(Duration::from_millis(1)),
            Ok(got) => {
                for (rank, m) in got {
                    if matches!(wire::parse_header(&m), Ok((wire::CLOSED, ..))) {
                        waiting.retain(|r| *r != rank);
                    }
                }
            }
            Err(_) => return,
        }
    }
}

impl MpiDispatcher {
    /// The dispatcher thread's loop. A panic here would leave the agents waiting: it
    /// ends the MPI job instead, with the message.
    fn run(mut self) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve()));
        if r.is_err() {
            eprintln!("multiprocess: the MPI pool dispatcher panicked; aborting the MPI job");
            mpi::topology::SimpleCommunicator::world().abort(70);
        }
    }

    fn serve(&mut self) {
        let mut idle = 0u32;
        loop {
            self.drain_commands();
            if self.terminating {
                self.abort_all(Error::Cancelled);
                self.close();
                return;
            }
            let sent = self.assign();
            if self.closed && self.jobs.is_empty() && self.queue.is_empty() {
                self.close();
                return;
            }
            let got = match receive(self.tag, 256) {
                Ok(g) => g,
                Err(e) => {
                    // MPI is gone (finalized at exit): nothing more can run.
                    self.broken = Some(e.to_string());
                    *lock(&self.shared.refusing) = Some(e.to_string());
                    self.abort_all(e);
                    return;
                }
            };
            let busy = sent || !got.is_empty();
            for (rank, msg) in got {
                self.handle(rank, &msg);
            }
            self.jobs.flush();
            if busy {
                idle = 0;
                continue;
            }
            idle = idle.saturating_add(1);
            if idle < SPIN_ROUNDS {
                std::thread::yield_now();
            } else {
                let fd = self.shared.wake_fd();
                let _ = poll_readable(&[fd], Some(super::idle_nap(idle)));
            }
        }
    }

    fn drain_commands(&mut self) {
        eventfd_drain(self.shared.wake_fd());
        let asked = self
            .jobs
            .take_commands(&self.shared, self.broken.as_deref());
        for id in asked.cancelled {
            self.cancel(id);
        }
        self.closed |= asked.close;
        self.terminating |= asked.terminate;
    }

    /// The next chunk to send: `(job, start, count, entry, message)`.
    fn next_chunk(&mut self) -> Option<(u64, u64, u64, i64, Vec<u8>)> {
        if let Some(c) = self.queue.pop_front() {
            return Some(c);
        }
        let c = self.jobs.next_chunk(Vec::new)?;
        Some((c.job, c.start, c.count, c.entry, c.frame))
    }

    /// Sends chunks to agents with room (about two chunks per worker); true if any.
    fn assign(&mut self) -> bool {
        let mut any = false;
        loop {
            // The agent with the most free room.
            let Some(i) = (0..self.agents.len())
                .filter(|&i| self.agents[i].inflight.len() < 2 * self.agents[i].workers)
                .max_by_key(|&i| 2 * self.agents[i].workers - self.agents[i].inflight.len())
            else {
                return any;
            };
            let Some((job, start, count, entry, mut frame)) = self.next_chunk() else {
                return any;
            };
            self.seq += 1;
            let seq = self.seq;
            set_chunk_prefix(&mut frame, seq, entry);
            let rank = self.agents[i].info.rank;
            let tag = self.tag;
            if let Err(e) = with_link(|_, world| {
                world.process_at_rank(rank).send_with_tag(&frame[..], tag);
            }) {
                self.queue.push_front((job, start, count, entry, frame));
                self.broken = Some(e.to_string());
                self.abort_all(e);
                return any;
            }
            any = true;
            self.agents[i].inflight.insert(
                seq,
                InFlight {
                    job,
                    start,
                    count,
                    done: vec![false; count as usize],
                    left: count,
                    sent: Instant::now(),
                },
            );
        }
    }

    fn handle(&mut self, rank: i32, msg: &[u8]) {
        let Some(ai) = self.agents.iter().position(|a| a.info.rank == rank) else {
            return;
        };
        let Ok((kind, seq, index, body)) = wire::parse_header(msg) else {
            return;
        };
        let host = self.agents[ai].info.host.clone();
        let remote = |error: Error| Error::OnHost {
            host: host.clone(),
            rank,
            error: Box::new(error),
        };
        let Some(c) = self.agents[ai].inflight.get_mut(&seq) else {
            return;
        };
        let (job, start) = (c.job, c.start);
        let mut outcomes: Vec<(u64, Option<Error>)> = Vec::new();
        let mut delivered = 0u64;
        match kind {
            wire::RESULTS => {
                if !self.jobs.contains(job) {
                    c.left = 0;
                    return self.retire(ai, seq);
                }
                // Results must fall inside the chunk they claim to be for: an index or a
                // count beyond it fails what is left of the chunk instead.
                let fits =
                    index < c.count && result_count(body).is_ok_and(|n| n <= c.count - index);
                let got = if fits {
                    super::relaying(&host, rank, || self.jobs.deliver(job, start + index, body))
                        .unwrap_or(Err(Error::Cancelled))
                } else {
                    Err(Error::protocol(format!(
                        "MPI rank {rank} sent results for items outside the chunk they belong to"
                    )))
                };
                match got {
                    Ok(n) => {
                        for k in index..(index + n).min(c.count) {
                            if !std::mem::replace(&mut c.done[k as usize], true) {
                                c.left -= 1;
                                delivered += 1;
                            }
                        }
                        self.jobs.account(job, delivered);
                    }
                    Err(e) => {
                        // Undecodable results: fail what is left of the chunk.
                        for k in 0..c.count {
                            if !c.done[k as usize] {
                                outcomes.push((k, Some(Error::Serialization(e.to_string()))));
                            }
                        }
                    }
                }
            }
            wire::FAIL => {
                let e = match wire::decode::<WireError>(body) {
                    Ok(w) => w.into_error(start),
                    Err(e) => e,
                };
                if index < c.count {
                    outcomes.push((index, Some(remote(e))));
                }
            }
            wire::ABORT => {
                let e = match wire::decode::<WireError>(body) {
                    Ok(w) => w.into_error(start),
                    Err(e) => e,
                };
                for k in 0..c.count {
                    if !c.done[k as usize] {
                        outcomes.push((k, Some(remote(clone_error(&e)))));
                    }
                }
            }
            _ => return,
        }
        let mut failed = 0u64;
        for (k, e) in outcomes {
            if std::mem::replace(&mut c.done[k as usize], true) {
                continue;
            }
            c.left -= 1;
            failed += 1;
            if let Some(e) = e {
                self.jobs.fail(job, start + k, e);
            }
        }
        {
            let busy = c.sent.elapsed();
            let finished = c.left == 0;
            let mut s = lock(&self.shared.stats);
            s.tasks_completed += delivered;
            s.tasks_failed += failed;
            let w = &mut s.workers[self.agents[ai].stats];
            w.tasks_completed += delivered;
            w.tasks_failed += failed;
            if finished {
                w.busy += busy;
            }
        }
        self.jobs.settle(job);
        self.retire(ai, seq);
    }

    /// Forgets a chunk once all its items are accounted for.
    fn retire(&mut self, ai: usize, seq: u64) {
        if self.agents[ai]
            .inflight
            .get(&seq)
            .is_some_and(|c| c.left == 0)
        {
            self.agents[ai].inflight.remove(&seq);
        }
    }

    /// Stops the work of a job cancelled in the job table, on the agents.
    fn cancel(&mut self, id: u64) {
        self.queue.retain(|c| c.0 != id);
        let mut cancels = Vec::new();
        for a in &self.agents {
            for (seq, c) in &a.inflight {
                if c.job == id {
                    cancels.push((a.info.rank, *seq));
                }
            }
        }
        let pool = self.pool;
        let _ = with_link(|_, world| {
            for (rank, seq) in cancels {
                if let Ok(m) = wire::encode(&Control::Cancel { pool, seq }) {
                    world
                        .process_at_rank(rank)
                        .send_with_tag(&m[..], TAG_CONTROL);
                }
            }
        });
    }

    fn abort_all(&mut self, e: Error) {
        self.jobs.abort_all(|| clone_error(&e));
        self.queue.clear();
    }

    fn close(&mut self) {
        *lock(&self.shared.refusing) = Some("the pool was closed".into());
        let ranks: Vec<i32> = self.agents.iter().map(|a| a.info.rank).collect();
        close_on_agents(self.pool, self.tag, &ranks);
        let mut s = lock(&self.shared.stats);
        for a in &self.agents {
            s.workers[a.stats].alive = false;
        }
    }
}

/// A copy of an error for each item it fails (errors are not `Clone`: `Io` holds an
/// `io::Error`, copied here by kind and message).
fn clone_error(e: &Error) -> Error {
    match e {
        Error::OnHost { host, rank, error } => Error::OnHost {
            host: host.clone(),
            rank: *rank,
            error: Box::new(clone_error(error)),
        },
        Error::Io(io) => Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => WireError::from_error(other).into_error(0),
    }
}
