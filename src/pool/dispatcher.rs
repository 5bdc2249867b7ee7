//! The pool's dispatcher: one thread that owns the workers, hands out chunks, collects
//! results, notices every death and timeout, and replaces workers.
//!
//! Each worker has a progress page (shared memory) where it records the chunk and the item
//! it is running. When a worker dies, that says exactly which item was running: that item
//! fails (`WorkerDied`, or `Timeout` if we killed it for overrunning), and the other items
//! of its chunk are queued again: the ones after it never ran, and the results of the ones
//! before it died with the worker, so they run again (use `chunksize(1)` where an item
//! must never run twice).
//!
//! A worker holds back the results of quick chunks while its next chunks already wait in
//! its socket, and sends them together (at most [`PIPELINE_DEPTH`]` / 2` of them, none for
//! longer than 0.5 ms). It keeps what it holds in the outbox of its page too, where the
//! dispatcher finds it if the worker dies (see `Dispatcher::recover_held`), and records
//! there the last chunk it finished, so a death never reruns a chunk of one item that
//! finished: one whose result was not yet in the outbox fails with `WorkerDied` naming it
//! (see `Dispatcher::results_lost`).

use super::jobs::JobTable;
use super::result::Sink;
use super::task::{
    self, chunk_of, set_chunk_prefix, stop_message, ChunkView, FromWorker, WorkerArgs, SLOT_DONE,
    SLOT_ITEM, SLOT_REVOKED, SLOT_SEQ, SLOT_STARTED,
};
use super::{PoolStats, WorkerStats};
use crate::connection::{pipe, Connection};
use crate::context::StartMethod;
use crate::error::{Error, Result};
use crate::process::{Builder, Process};
use crate::sys::fd::{eventfd, eventfd_drain, eventfd_signal, poll_readable};
use crate::sys::page::SharedPage;
use crate::sys::process::{self as sysproc};
use serde::Serialize;
use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often a busy worker's resident memory is checked against the limit.
const MEMORY_CHECK: Duration = Duration::from_millis(20);

/// Frames at most this big may be sent to a worker that is still busy (they fit in the
/// socket buffer, so sending never blocks the dispatcher).
const PIPELINE_FRAME: usize = 32 * 1024;

/// How many chunks a worker may have been sent and not answered: enough that it never
/// idles between tiny items (its next ones are already in its socket) and that they go
/// out, and their results come back, many per system call.
pub(crate) const PIPELINE_DEPTH: usize = 64;
/// The same for a worker whose last chunk took longer than [`SLOW_CHUNK`]: items that
/// long gain nothing from a deep pipeline, and would wait behind each other on one
/// worker while another is free.
const SLOW_DEPTH: usize = 2;
const SLOW_CHUNK: Duration = Duration::from_millis(1);

/// How long the dispatcher keeps looking (yielding between looks) after its last event
/// before it sleeps in `poll`.
const DISPATCH_SPIN: Duration = Duration::from_micros(50);

pub(crate) struct Config {
    pub processes: usize,
    pub max_tasks: Option<u64>,
    pub init: Option<(i64, Vec<u8>)>,
    pub fin: Option<(i64, Vec<u8>)>,
    pub method: StartMethod,
    pub timeout: Option<Duration>,
    pub grace: Duration,
    pub retries: u32,
    pub progress: bool,
    pub memory_limit: Option<u64>,
}

/// Where the input of a job comes from, chunk by chunk.
pub(crate) trait Source: Send {
    /// Up to `max` more items: `(count, frame)`; `None` when the input is exhausted.
    /// `spare` is the memory of an earlier frame to build the new one in (or empty).
    fn next_chunk(&mut self, max: usize, spare: Vec<u8>) -> Option<(u64, Result<Vec<u8>>)>;

    /// Asked after [`next_chunk`](Self::next_chunk) gave `None`: whether more input may
    /// still come (it is being encoded elsewhere, and the dispatcher is woken when it
    /// is). The job is then looked at again rather than taken as exhausted.
    fn more_later(&mut self) -> bool {
        false
    }
}

pub(crate) struct IterSource<I> {
    pub iter: I,
    /// The item-offset buffer, reused from chunk to chunk.
    pub ends: Vec<u64>,
}

impl<I> IterSource<I> {
    pub(crate) fn new(iter: I) -> Self {
        IterSource {
            iter,
            ends: Vec::new(),
        }
    }
}

impl<I> Source for IterSource<I>
where
    I: Iterator + Send,
    I::Item: Serialize,
{
    fn next_chunk(&mut self, max: usize, spare: Vec<u8>) -> Option<(u64, Result<Vec<u8>>)> {
        task::encode_chunk(&mut self.iter, max, usize::MAX, spare, &mut self.ends)
    }
}

pub(crate) struct Job {
    pub id: u64,
    pub entry: i64,
    pub chunksize: usize,
    pub source: Box<dyn Source>,
    pub sink: Box<dyn Sink>,
    /// For lazy iterators: at most this many items pulled and not yet consumed.
    pub window: Option<(u64, Arc<AtomicU64>)>,
    /// How many items, when known (for the progress bar).
    pub len: Option<u64>,
    /// Its own timeout and retries (`Pool::schedule`), over the pool's.
    pub opts: TaskOptions,
    /// The span of the call that submitted it: the dispatcher's events about its items
    /// are recorded in it.
    pub span: tracing::Span,
}

/// A job's own settings, over the pool's ([`super::Schedule`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TaskOptions {
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
}

pub(crate) enum Command {
    Submit(Job),
    Cancel(u64),
    /// The job's result was dropped: run none of its items that have not started.
    Forget(u64),
    Close,
    Terminate,
}

/// What the pool's handle shares with its dispatcher.
pub(crate) struct Shared {
    cmds: Mutex<VecDeque<Command>>,
    wake: OwnedFd,
    pub(crate) stats: Mutex<PoolStats>,
    /// Set when the pool can take no more work (closed, terminated, broken), with why.
    pub(crate) refusing: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn new() -> Result<Arc<Shared>> {
        Ok(Arc::new(Shared {
            cmds: Mutex::new(VecDeque::new()),
            wake: eventfd()?,
            stats: Mutex::new(PoolStats::default()),
            refusing: Mutex::new(None),
        }))
    }

    pub(crate) fn send(&self, c: Command) {
        lock(&self.cmds).push_back(c);
        self.poke();
    }

    pub(crate) fn poke(&self) {
        eventfd_signal(self.wake.as_fd());
    }

    /// The commands sent so far (see [`super::jobs::JobTable::take_commands`]).
    pub(crate) fn take_commands(&self) -> Vec<Command> {
        lock(&self.cmds).drain(..).collect()
    }

    /// Readable when a command is waiting (drain with `eventfd_drain`).
    pub(crate) fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.wake.as_fd()
    }
}

struct Chunk {
    seq: u64,
    job: u64,
    start: u64,
    count: u64,
    frame: Vec<u8>,
    entry: i64,
    attempts: u32,
    opts: TaskOptions,
}

enum KillReason {
    Timeout { seq: u64 },
    Memory { seq: u64, used: u64 },
    Cancelled,
}

struct Worker {
    /// Its slot, `0..processes` ([`super::worker_id`]), taken over by its replacement.
    slot: usize,
    process: Process,
    pidfd: OwnedFd,
    conn: Connection,
    page: SharedPage,
    ready: bool,
    inflight: VecDeque<(Chunk, Instant)>,
    /// Whether its last chunk took longer than [`SLOW_CHUNK`] (see [`SLOW_DEPTH`]).
    slow: bool,
    /// When its last result arrived: a pipelined chunk runs from then, or from when it
    /// was sent if that is later.
    last_result: Instant,
    assigned: u64,
    retiring: bool,
    kill: Option<(KillReason, Instant, bool)>,
    memory_checked: Instant,
    stats: usize,
}

pub(crate) struct Dispatcher {
    cfg: Config,
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    jobs: JobTable,
    queue: VecDeque<Chunk>,
    seq: u64,
    closed: bool,
    terminating: bool,
    worker_no: u64,
    init_failures: u32,
    broken: Option<String>,
    /// Buffers kept for reuse: fresh memory costs a page fault per 4 KiB, which for
    /// tiny tasks is more than the tasks themselves.
    rbuf: Vec<u8>,
    spare_frames: Vec<Vec<u8>>,
    /// Jobs whose result was dropped: their chunks are never queued again.
    forgotten: HashSet<u64>,
    /// When the current round of the loop found messages to read.
    round: Instant,
}

/// How many chunk buffers are kept for reuse, and the largest kept.
const SPARE_FRAMES: usize = 4;
const SPARE_FRAME_MAX: usize = 16 << 20;

impl Dispatcher {
    /// Starts the initial workers (so that errors surface in `Pool::new`).
    pub(crate) fn new(cfg: Config, shared: Arc<Shared>) -> Result<Dispatcher> {
        let progress = cfg.progress;
        let mut d = Dispatcher {
            cfg,
            shared,
            workers: Vec::new(),
            jobs: JobTable::new(progress),
            queue: VecDeque::new(),
            seq: 0,
            closed: false,
            terminating: false,
            worker_no: 0,
            init_failures: 0,
            broken: None,
            rbuf: Vec::new(),
            spare_frames: Vec::new(),
            forgotten: HashSet::new(),
            round: Instant::now(),
        };
        while d.workers.len() < d.cfg.processes {
            let w = d.spawn_worker()?;
            d.workers.push(w);
        }
        Ok(d)
    }

    /// The lowest slot no live worker holds.
    fn free_slot(&self) -> usize {
        (0..)
            .find(|s| !self.workers.iter().any(|w| w.slot == *s))
            .expect("a free slot")
    }

    fn spawn_worker(&mut self) -> Result<Worker> {
        let slot = self.free_slot();
        self.worker_no += 1;
        let (ours, theirs) = pipe()?;
        let page = SharedPage::new()?;
        let args = WorkerArgs {
            conn: theirs,
            page: page.try_clone()?,
            timed: self.cfg.timeout.is_some(),
            init: self.cfg.init.clone(),
            fin: self.cfg.fin.clone(),
            max_tasks: self.cfg.max_tasks,
            slot,
        };
        let name = format!("PoolWorker-{}", self.worker_no);
        let process = Builder::new()
            .name(name.clone())
            .daemon(true)
            .start_method(self.cfg.method)
            .build(task::worker_main, args);
        process.start()?;
        let pid = process.pid().expect("started");
        let pidfd = sysproc::pidfd_open(pid)?;
        let mut stats = lock(&self.shared.stats);
        stats.workers.push(WorkerStats {
            name,
            pid,
            alive: true,
            ..WorkerStats::default()
        });
        if self.worker_no > self.cfg.processes as u64 {
            stats.workers_replaced += 1;
        }
        let index = stats.workers.len() - 1;
        drop(stats);
        if self.worker_no > self.cfg.processes as u64 {
            tracing::info!(target: "multiprocess", worker = %process.name(), pid, slot, "pool worker replaced");
        }
        tracing::debug!(target: "multiprocess", worker = %process.name(), pid, slot, "pool worker started");
        Ok(Worker {
            slot,
            process,
            pidfd,
            conn: ours,
            page,
            ready: false,
            inflight: VecDeque::new(),
            slow: false,
            last_result: Instant::now(),
            assigned: 0,
            retiring: false,
            kill: None,
            memory_checked: Instant::now(),
            stats: index,
        })
    }

    /// The dispatcher thread's loop.
    pub(crate) fn run(mut self) {
        let mut active = Instant::now();
        loop {
            self.drain_commands();
            if self.terminating {
                self.terminate_all();
                return;
            }
            self.replace_workers();
            self.assign();
            if self.closed && self.jobs.is_empty() && self.queue.is_empty() {
                self.stop_all();
                return;
            }
            let mut fds = vec![self.shared.wake_fd()];
            for w in &self.workers {
                fds.push(w.conn.as_fd());
                fds.push(w.pidfd.as_fd());
            }
            // Messages already read ahead into a connection's buffer do not show in poll.
            let buffered = self.workers.iter().any(|w| w.conn.has_buffered());
            let timeout = if buffered {
                Some(Duration::ZERO)
            } else if active.elapsed() < DISPATCH_SPIN
                && self.workers.iter().any(|w| w.inflight.is_empty())
            {
                // Something happened just now and a worker is idle, so this thread takes
                // no core a worker needs: more is likely to follow at once (the reply to
                // what was just sent, the next call of a caller that just got its
                // result). Look again without sleeping, letting others run first: a
                // sleep and a wake-up cost more than the round trip itself.
                std::thread::yield_now();
                Some(Duration::ZERO)
            } else {
                self.next_deadline()
            };
            let ready = match poll_readable(&fds, timeout) {
                Ok(r) => r,
                Err(_) => continue,
            };
            if ready.iter().any(|r| r.readable) {
                active = Instant::now();
                // One clock read per round: results read in this round arrived together.
                self.round = active;
            } else if buffered {
                self.round = Instant::now();
            }
            if ready[0].readable {
                eventfd_drain(self.shared.wake_fd());
            }
            // In reverse, so that removing worker i (swap_remove) only moves one that was
            // already handled.
            for i in (0..self.workers.len()).rev() {
                let (msg, dead) = (ready[1 + 2 * i].readable, ready[2 + 2 * i].readable);
                let mut removed = false;
                if msg || self.workers[i].conn.has_buffered() {
                    removed = self.read_worker(i);
                    while !removed && self.workers[i].conn.has_buffered() {
                        removed = self.read_worker(i);
                    }
                }
                if dead && !removed {
                    // Take whatever it sent before it died, then account for the death.
                    while !removed
                        && (self.workers[i].conn.has_buffered()
                            || poll_readable(&[self.workers[i].conn.as_fd()], Some(Duration::ZERO))
                                .map(|r| r[0].readable)
                                .unwrap_or(false))
                    {
                        removed = self.read_worker(i);
                    }
                    if !removed {
                        self.worker_died(i);
                    }
                }
            }
            // Results of this round reach their consumers together.
            self.jobs.flush();
            self.check_timeouts();
        }
    }

    fn drain_commands(&mut self) {
        let asked = self
            .jobs
            .take_commands(&self.shared, self.broken.as_deref());
        for id in asked.cancelled {
            self.cancel(id);
        }
        for id in asked.forgotten {
            self.forget(id);
        }
        self.closed |= asked.close;
        self.terminating |= asked.terminate;
    }

    fn replace_workers(&mut self) {
        if self.broken.is_some() || (self.closed && self.jobs.is_empty()) {
            return;
        }
        while self.workers.len() < self.cfg.processes {
            match self.spawn_worker() {
                Ok(w) => self.workers.push(w),
                Err(e) => {
                    self.break_pool(format!("could not start a pool worker: {e}"));
                    return;
                }
            }
        }
    }

    fn break_pool(&mut self, why: String) {
        *lock(&self.shared.refusing) = Some(why.clone());
        self.broken = Some(why.clone());
        self.jobs.abort_all(|| Error::process(why.clone()));
        self.queue.clear();
    }

    fn next_chunk(&mut self) -> Option<Chunk> {
        if let Some(c) = self.queue.pop_front() {
            return Some(c);
        }
        let spare = &mut self.spare_frames;
        let c = self.jobs.next_chunk(|| spare.pop().unwrap_or_default())?;
        self.seq += 1;
        Some(Chunk {
            seq: self.seq,
            job: c.job,
            start: c.start,
            count: c.count,
            frame: c.frame,
            entry: c.entry,
            attempts: 0,
            opts: c.opts,
        })
    }

    fn assign(&mut self) {
        // Idle workers first, then more chunks to busy ones: a short task is not queued
        // behind a long one while a worker is free.
        self.assign_pass(false);
        // Nor behind a long one while a worker is starting: the next chunk for each
        // starting worker is held back from the pipeline, and waits for that worker.
        let starting = self
            .workers
            .iter()
            .filter(|w| !w.ready && !w.retiring && w.kill.is_none())
            .count();
        let mut held = Vec::with_capacity(starting);
        while held.len() < starting {
            match self.next_chunk() {
                Some(c) => held.push(c),
                None => break,
            }
        }
        if held.len() == starting {
            self.assign_pass(true);
        }
        for c in held.into_iter().rev() {
            self.queue.push_front(c);
        }
    }

    fn assign_pass(&mut self, pipeline: bool) {
        let mut batch: Vec<Chunk> = Vec::new();
        for i in 0..self.workers.len() {
            loop {
                let w = &self.workers[i];
                let depth = if w.slow { SLOW_DEPTH } else { PIPELINE_DEPTH };
                if !w.ready
                    || w.retiring
                    || w.kill.is_some()
                    || w.inflight.len() + batch.len() >= depth
                {
                    break;
                }
                let idle = w.inflight.is_empty() && batch.is_empty();
                if !pipeline && !idle {
                    break;
                }
                if let Some((c, _)) = w.inflight.front() {
                    if c.frame.len() > PIPELINE_FRAME {
                        break;
                    }
                }
                let busy = !w.inflight.is_empty() || !batch.is_empty();
                let Some(mut chunk) = self.next_chunk() else {
                    break;
                };
                if busy && chunk.frame.len() > PIPELINE_FRAME {
                    self.queue.push_front(chunk);
                    break;
                }
                set_chunk_prefix(&mut chunk.frame, chunk.seq, chunk.entry);
                let big = chunk.frame.len() > PIPELINE_FRAME;
                batch.push(chunk);
                let w = &mut self.workers[i];
                w.assigned += 1;
                if self.cfg.max_tasks == Some(w.assigned) {
                    w.retiring = true;
                }
                if big {
                    break;
                }
            }
            if batch.is_empty() {
                continue;
            }
            // Everything for this worker in one write: one system call and one wake-up.
            let frames: Vec<&[u8]> = batch.iter().map(|c| &c.frame[..]).collect();
            let sent = self.workers[i].conn.send_frames(&frames);
            drop(frames);
            let w = &mut self.workers[i];
            if sent.is_err() {
                // The worker is going away; its death will be noticed by poll. What it
                // may have received is run again elsewhere.
                w.retiring = true;
                for c in batch.drain(..).rev() {
                    self.queue.push_front(c);
                }
                continue;
            }
            let now = Instant::now();
            w.inflight.extend(batch.drain(..).map(|c| (c, now)));
        }
    }

    /// Reads one message from worker `i`. Returns true if the worker was removed.
    fn read_worker(&mut self, i: usize) -> bool {
        let mut msg = std::mem::take(&mut self.rbuf);
        if self.workers[i].conn.recv_bytes_reusing(&mut msg).is_err() {
            self.rbuf = msg;
            self.worker_died(i);
            return true;
        }
        let removed = self.handle_message(i, &msg);
        self.rbuf = msg;
        removed
    }

    /// Handles one message from worker `i`. Returns true if the worker was removed.
    fn handle_message(&mut self, i: usize, msg: &[u8]) -> bool {
        match FromWorker::parse(msg) {
            Ok(FromWorker::Ready) => {
                self.workers[i].ready = true;
                self.init_failures = 0;
            }
            Ok(FromWorker::InitFailed(why)) => {
                self.init_failures += 1;
                if self.init_failures >= 3 {
                    self.break_pool(format!("the pool's initializer failed: {why}"));
                }
            }
            Ok(reply @ (FromWorker::Done { .. } | FromWorker::ChunkFailed { .. })) => {
                self.on_reply(i, reply)
            }
            Err(_) => {
                // Garbage from a worker: it cannot be trusted any more.
                let _ = self.workers[i].process.kill();
                self.worker_died(i);
                return true;
            }
        }
        false
    }

    /// A chunk's reply from worker `i`; one for a chunk no longer in flight (recovered
    /// from a dead worker's outbox after it came through the socket) is ignored.
    fn on_reply(&mut self, i: usize, reply: FromWorker<'_>) {
        match reply {
            FromWorker::Done { seq, results } => {
                if let Some(chunk) = self.take_inflight(i, seq) {
                    self.deliver(i, chunk, results);
                }
            }
            FromWorker::ChunkFailed { seq, error } => {
                if let Some((chunk, _)) = self.take_inflight(i, seq) {
                    for k in 0..chunk.count {
                        self.fail(chunk.job, chunk.start + k, Error::protocol(error.clone()));
                    }
                    self.jobs.settle(chunk.job);
                }
            }
            FromWorker::Ready | FromWorker::InitFailed(_) => {}
        }
    }

    /// Results dead worker `i` held back and had not sent (see `task::Outbox`): taken
    /// from its progress page and delivered as if they had come through the socket,
    /// which has been read to its end. Anything but a chunk's reply ends the recovery;
    /// the chunks it would have covered count as run and lost.
    fn recover_held(&mut self, i: usize) {
        for msg in task::held_results(&self.workers[i].page) {
            match FromWorker::parse(&msg) {
                Ok(reply @ (FromWorker::Done { .. } | FromWorker::ChunkFailed { .. })) => {
                    self.on_reply(i, reply)
                }
                _ => break,
            }
        }
    }

    fn take_inflight(&mut self, i: usize, seq: u64) -> Option<(Chunk, Instant)> {
        let w = &mut self.workers[i];
        let pos = w.inflight.iter().position(|(c, _)| c.seq == seq)?;
        w.inflight.remove(pos)
    }

    fn deliver(&mut self, i: usize, (chunk, sent): (Chunk, Instant), bytes: &[u8]) {
        let now = self.round.max(sent);
        let busy = now.duration_since(sent.max(self.workers[i].last_result));
        self.workers[i].last_result = now;
        let chunk = self.recycle(chunk);
        self.workers[i].slow = busy > SLOW_CHUNK;
        let stats_index = self.workers[i].stats;
        // Results for another number of items than the chunk's would land on other
        // chunks' items: the chunk fails instead, and its items are settled.
        if super::result::result_count(bytes).ok() != Some(chunk.count) {
            for k in 0..chunk.count {
                self.fail(
                    chunk.job,
                    chunk.start + k,
                    Error::protocol(
                        "a pool worker answered a chunk with another number of results",
                    ),
                );
            }
            self.jobs.settle(chunk.job);
            return;
        }
        let (ok, failed) = match self.jobs.deliver(chunk.job, chunk.start, bytes) {
            None => return,
            Some(Ok(_)) => (chunk.count, 0),
            Some(Err(e)) => {
                for k in 0..chunk.count {
                    self.jobs.fail(
                        chunk.job,
                        chunk.start + k,
                        Error::Serialization(e.to_string()),
                    );
                }
                (0, chunk.count)
            }
        };
        self.jobs.account(chunk.job, ok);
        {
            let mut s = lock(&self.shared.stats);
            s.tasks_completed += ok;
            s.tasks_failed += failed;
            let w = &mut s.workers[stats_index];
            w.tasks_completed += ok;
            w.tasks_failed += failed;
            w.busy += busy;
        }
        self.jobs.settle(chunk.job);
    }

    /// Keeps a delivered chunk's frame buffer for the next chunk.
    fn recycle(&mut self, mut chunk: Chunk) -> Chunk {
        let frame = std::mem::take(&mut chunk.frame);
        if self.spare_frames.len() < SPARE_FRAMES && frame.capacity() <= SPARE_FRAME_MAX {
            self.spare_frames.push(frame);
        }
        chunk
    }

    fn fail(&mut self, job: u64, index: u64, e: Error) {
        if self.jobs.fail(job, index, e) {
            lock(&self.shared.stats).tasks_failed += 1;
        }
    }

    fn requeue(&mut self, chunk: &Chunk, range: std::ops::Range<usize>, attempts: u32) {
        if range.is_empty() || !self.jobs.contains(chunk.job) {
            self.forgotten.remove(&chunk.job);
            return;
        }
        if self.forgotten.contains(&chunk.job) {
            let start = chunk.start + range.start as u64;
            self.jobs.fail_unsent(chunk.job, start, range.len() as u64);
            return;
        }
        let frame = match ChunkView::parse(chunk_of(&chunk.frame)) {
            Ok(v) => v.slice(range.clone()),
            Err(_) => return,
        };
        self.seq += 1;
        self.queue.push_front(Chunk {
            seq: self.seq,
            job: chunk.job,
            start: chunk.start + range.start as u64,
            count: range.len() as u64,
            frame,
            entry: chunk.entry,
            attempts,
            opts: chunk.opts,
        });
    }

    fn worker_died(&mut self, i: usize) {
        let _ = self.workers[i].process.kill();
        let _ = self.workers[i]
            .process
            .join_timeout(Duration::from_secs(10));
        if self.workers[i].process.exit_status().is_some() {
            // It has exited: nothing writes its page any more.
            self.recover_held(i);
        }
        let mut w = self.workers.swap_remove(i);
        let status = w.process.exit_status();
        let running = w.page.slot(SLOT_SEQ).load(Ordering::Acquire);
        let item = w.page.slot(SLOT_ITEM).load(Ordering::Acquire) as usize;
        {
            let mut s = lock(&self.shared.stats);
            s.workers[w.stats].alive = false;
        }
        if !w.ready && w.inflight.is_empty() && !matches!(status.map(|s| s.success()), Some(true)) {
            self.init_failures += 1;
            if self.init_failures >= 3 && self.broken.is_none() {
                let why = match status {
                    Some(s) => format!("pool workers die while starting ({s})"),
                    None => "pool workers die while starting".into(),
                };
                self.break_pool(why);
            }
        }
        let kill = w.kill.take();
        let pid = w.process.pid().unwrap_or(0);
        let name = w.process.name();
        let task = w
            .inflight
            .iter()
            .find(|(c, _)| c.seq == running && c.count > 0)
            .map(|(c, _)| (c.job, c.start + (item as u64).min(c.count - 1)));
        {
            let _span = task
                .and_then(|(job, _)| self.jobs.span(job))
                .map(|s| s.entered());
            let task = task.map(|(_, t)| t);
            let (signal, code) = match status {
                Some(crate::ExitStatus::Signaled(n)) => (crate::signal_name(n), None),
                Some(crate::ExitStatus::Exited(c)) => (None, Some(c)),
                None => (None, None),
            };
            match &kill {
                Some((KillReason::Timeout { .. }, ..)) => tracing::warn!(
                    target: "multiprocess", worker = %name, pid, task, signal,
                    "task timed out: pool worker killed"
                ),
                Some((KillReason::Memory { used, .. }, ..)) => tracing::warn!(
                    target: "multiprocess", worker = %name, pid, task, used,
                    limit = self.cfg.memory_limit.unwrap_or(0),
                    "memory limit hit: pool worker killed"
                ),
                Some((KillReason::Cancelled, ..)) => tracing::info!(
                    target: "multiprocess", worker = %name, pid, task,
                    "task cancelled: pool worker killed"
                ),
                None if w.retiring && status.is_some_and(|s| s.success()) => tracing::debug!(
                    target: "multiprocess", worker = %name, pid, "pool worker exited"
                ),
                None => tracing::warn!(
                    target: "multiprocess", worker = %name, pid, task, signal, exit_code = code,
                    "pool worker died{}",
                    match (signal, code) {
                        (Some(sig), _) => format!(" with {sig}"),
                        (None, Some(c)) => format!(" with exit code {c}"),
                        _ => String::new(),
                    }
                ),
            }
        }
        // Replace it before reporting its failures, so that whoever sees the failure
        // finds a full pool.
        self.replace_workers();
        // Chunks run in the order they were sent: every one up to the last the worker
        // finished ran; one still in flight finished between recording so and keeping
        // its result in the outbox, and its result died with the worker.
        let finished = w.page.slot(SLOT_DONE).load(Ordering::Acquire);
        let ran = w
            .inflight
            .iter()
            .position(|(c, _)| c.seq == finished)
            .map_or(0, |p| p + 1);
        for (pos, (chunk, _)) in std::mem::take(&mut w.inflight).into_iter().enumerate() {
            let n = chunk.count as usize;
            if pos < ran {
                self.results_lost(chunk, pid, status, kill.as_ref());
                continue;
            }
            if chunk.seq != running || n == 0 {
                // It had not started.
                self.requeue(&chunk, 0..n, chunk.attempts);
                continue;
            }
            let k = item.min(n - 1);
            self.requeue(&chunk, (k + 1)..n, chunk.attempts);
            self.requeue(&chunk, 0..k, chunk.attempts);
            let culprit = chunk.start + k as u64;
            let retries = chunk.opts.retries.unwrap_or(self.cfg.retries);
            match &kill {
                Some((KillReason::Timeout { seq }, ..)) if *seq == chunk.seq => self.fail(
                    chunk.job,
                    culprit,
                    Error::Timeout {
                        pid: Some(pid),
                        task: Some(culprit),
                    },
                ),
                Some((KillReason::Memory { seq, used }, ..)) if *seq == chunk.seq => {
                    let limit = self.cfg.memory_limit.unwrap_or(0);
                    self.fail(
                        chunk.job,
                        culprit,
                        Error::MemoryLimit {
                            task: Some(culprit),
                            limit,
                            used: *used,
                        },
                    )
                }
                Some((KillReason::Cancelled, ..)) => self.requeue(&chunk, k..k + 1, chunk.attempts),
                _ if chunk.attempts < retries => {
                    let _span = self.jobs.span(chunk.job).map(|s| s.entered());
                    tracing::info!(
                        target: "multiprocess", task = culprit, attempt = chunk.attempts + 1,
                        retries, "task retried on another worker"
                    );
                    drop(_span);
                    self.requeue(&chunk, k..k + 1, chunk.attempts + 1)
                }
                _ => {
                    let status = status.unwrap_or(crate::ExitStatus::Signaled(libc::SIGKILL));
                    self.fail(
                        chunk.job,
                        culprit,
                        Error::WorkerDied {
                            pid,
                            status,
                            task: Some(culprit),
                        },
                    );
                }
            }
            self.jobs.settle(chunk.job);
        }
    }

    /// A chunk ran on a worker that died before its results left: an item of a job with
    /// chunk size 1 (where an item never runs twice) fails with [`Error::WorkerDied`]
    /// naming it, unless retries are allowed or the worker was killed to cancel another
    /// job; the items of a job with larger chunks run again, as the items before a crash
    /// in the same chunk do.
    fn results_lost(
        &mut self,
        chunk: Chunk,
        pid: u32,
        status: Option<crate::ExitStatus>,
        kill: Option<&(KillReason, Instant, bool)>,
    ) {
        let n = chunk.count as usize;
        let retries = chunk.opts.retries.unwrap_or(self.cfg.retries);
        let once = self.jobs.chunksize(chunk.job) == Some(1);
        if !once || chunk.attempts < retries || matches!(kill, Some((KillReason::Cancelled, ..))) {
            self.requeue(&chunk, 0..n, chunk.attempts);
            return;
        }
        let status = status.unwrap_or(crate::ExitStatus::Signaled(libc::SIGKILL));
        for k in chunk.start..chunk.start + chunk.count {
            self.fail(
                chunk.job,
                k,
                Error::WorkerDied {
                    pid,
                    status,
                    task: Some(k),
                },
            );
        }
        self.jobs.settle(chunk.job);
    }

    /// A job whose result was dropped: its chunks not sent yet never run. Chunks a
    /// worker has already been given run on (unless the job is cancelled).
    fn forget(&mut self, id: u64) {
        self.forgotten.insert(id);
        let mut unsent = Vec::new();
        // A chunk waiting in a worker behind the one it runs: take it back unless it has
        // just started (see SLOT_REVOKED in `task`).
        for w in &mut self.workers {
            let Some(pos) = w.inflight.iter().position(|(c, _)| {
                c.job == id && c.seq != w.page.slot(SLOT_SEQ).load(Ordering::SeqCst)
            }) else {
                continue;
            };
            let seq = w.inflight[pos].0.seq;
            w.page.slot(SLOT_REVOKED).store(seq, Ordering::SeqCst);
            if w.page.slot(SLOT_SEQ).load(Ordering::SeqCst) != seq {
                if let Some((c, _)) = w.inflight.remove(pos) {
                    unsent.push((c.start, c.count));
                }
            }
        }
        self.queue.retain(|c| {
            if c.job == id {
                unsent.push((c.start, c.count));
                false
            } else {
                true
            }
        });
        if !unsent.is_empty() {
            tracing::debug!(
                target: "multiprocess", job = id, chunks = unsent.len(),
                "result dropped: tasks not started are removed from the queue"
            );
        }
        for (start, count) in unsent {
            self.jobs.fail_unsent(id, start, count);
        }
    }

    /// Stops the work of a job cancelled in the job table.
    fn cancel(&mut self, id: u64) {
        self.queue.retain(|c| c.job != id);
        for w in &mut self.workers {
            if w.inflight.iter().any(|(c, _)| c.job == id) {
                let _ = w.process.kill();
                w.kill = Some((KillReason::Cancelled, Instant::now(), true));
            }
        }
    }

    fn check_timeouts(&mut self) {
        let now = Instant::now();
        let now_ns = sysproc::monotonic_ns();
        for w in &mut self.workers {
            match &mut w.kill {
                Some((_, at, killed)) => {
                    if !*killed && now.duration_since(*at) >= self.cfg.grace {
                        let _ = w.process.kill();
                        *killed = true;
                    }
                }
                None => {
                    if let Some(limit) = self.cfg.memory_limit {
                        let seq = w.page.slot(SLOT_SEQ).load(Ordering::Acquire);
                        if seq != 0 && now.duration_since(w.memory_checked) >= MEMORY_CHECK {
                            w.memory_checked = now;
                            let used = w
                                .process
                                .pid()
                                .and_then(sysproc::resident_bytes)
                                .unwrap_or(0);
                            if used > limit {
                                let _ = w.process.kill();
                                w.kill = Some((KillReason::Memory { seq, used }, now, true));
                                continue;
                            }
                        }
                    }
                    let seq = w.page.slot(SLOT_SEQ).load(Ordering::Acquire);
                    let started = w.page.slot(SLOT_STARTED).load(Ordering::Relaxed);
                    if seq == 0 || started == 0 {
                        continue;
                    }
                    let Some((chunk, _)) = w.inflight.iter().find(|(c, _)| c.seq == seq) else {
                        continue;
                    };
                    let Some(timeout) = chunk.opts.timeout.or(self.cfg.timeout) else {
                        continue;
                    };
                    if now_ns.saturating_sub(started) >= timeout.as_nanos() as u64 {
                        let _ = w.process.terminate();
                        w.kill = Some((KillReason::Timeout { seq }, now, false));
                    }
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let mut consider = |d: Duration| next = Some(next.map_or(d, |n| n.min(d)));
        let now_ns = sysproc::monotonic_ns();
        for w in &self.workers {
            if self.cfg.memory_limit.is_some() && w.kill.is_none() && !w.inflight.is_empty() {
                consider(
                    MEMORY_CHECK
                        .saturating_sub(w.memory_checked.elapsed())
                        .max(Duration::from_millis(1)),
                );
            }
            match &w.kill {
                Some((_, at, false)) => consider(self.cfg.grace.saturating_sub(at.elapsed())),
                Some(_) => {}
                None => {
                    let timeout = w
                        .inflight
                        .iter()
                        .filter_map(|(c, _)| c.opts.timeout)
                        .min()
                        .or(self.cfg.timeout);
                    if let Some(timeout) = timeout {
                        if !w.inflight.is_empty() {
                            let started = w.page.slot(SLOT_STARTED).load(Ordering::Relaxed);
                            let elapsed = Duration::from_nanos(now_ns.saturating_sub(started));
                            // Re-check at least every 10 ms while an item runs.
                            consider(
                                timeout
                                    .saturating_sub(elapsed)
                                    .clamp(Duration::from_millis(1), Duration::from_millis(10)),
                            );
                        }
                    }
                }
            }
        }
        next
    }

    fn stop_all(&mut self) {
        for w in &self.workers {
            let _ = w.conn.send_bytes(&stop_message());
        }
        for w in std::mem::take(&mut self.workers) {
            if !w
                .process
                .join_timeout(Duration::from_secs(5))
                .unwrap_or(false)
            {
                let _ = w.process.kill();
                let _ = w.process.join_timeout(Duration::from_secs(5));
            }
            tracing::debug!(
                target: "multiprocess", worker = %w.process.name(),
                pid = w.process.pid().unwrap_or(0), status = ?w.process.exit_status(),
                "pool worker exited"
            );
            lock(&self.shared.stats).workers[w.stats].alive = false;
        }
    }

    fn terminate_all(&mut self) {
        *lock(&self.shared.refusing) = Some("the pool was terminated".into());
        for w in &self.workers {
            let _ = w.process.terminate();
        }
        let deadline = Instant::now() + Duration::from_millis(300);
        for w in std::mem::take(&mut self.workers) {
            let left = deadline.saturating_duration_since(Instant::now());
            if !w.process.join_timeout(left).unwrap_or(false) {
                let _ = w.process.kill();
                let _ = w.process.join_timeout(Duration::from_secs(5));
            }
            lock(&self.shared.stats).workers[w.stats].alive = false;
        }
        self.jobs.abort_all(|| Error::Cancelled);
        self.queue.clear();
    }
}
