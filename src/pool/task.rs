//! What travels between a pool and its workers: chunks of items, the entry functions that
//! run them, and the worker's main loop.
//!
//! A chunk's frame is `[item bytes…][end offset of each item: u64 LE…][item count: u64 LE]`:
//! items are encoded one by one so that a chunk can be split again (after a crash the
//! items that did not run are sent elsewhere) without decoding them.

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::spawn::target::{self, Target};
use crate::sys::image;
use crate::sys::page::SharedPage;
use crate::sys::process as sysproc;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;

/// Slots of a worker's progress page.
pub(crate) const SLOT_SEQ: usize = 0; // the chunk being run (0: none)
pub(crate) const SLOT_ITEM: usize = 1; // index in that chunk of the item being run
pub(crate) const SLOT_STARTED: usize = 2; // CLOCK_MONOTONIC ns when that item started

/// Items encoded one by one, in a frame ready to send.
pub(crate) struct ChunkBuilder {
    data: Vec<u8>,
    ends: Vec<u64>,
}

impl ChunkBuilder {
    pub(crate) fn new() -> Self {
        ChunkBuilder {
            data: Vec::new(),
            ends: Vec::new(),
        }
    }

    pub(crate) fn push<A: Serialize>(&mut self, item: &A) -> Result<()> {
        self.data = postcard::to_extend(item, std::mem::take(&mut self.data))
            .map_err(Error::serialization)?;
        self.ends.push(self.data.len() as u64);
        Ok(())
    }

    pub(crate) fn push_raw(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
        self.ends.push(self.data.len() as u64);
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let n = self.ends.len() as u64;
        self.data.reserve(self.ends.len() * 8 + 8);
        for e in &self.ends {
            self.data.extend_from_slice(&e.to_le_bytes());
        }
        self.data.extend_from_slice(&n.to_le_bytes());
        self.data
    }
}

/// A parsed chunk frame.
pub(crate) struct ChunkView<'a> {
    data: &'a [u8],
    ends: &'a [u8],
    n: usize,
}

impl<'a> ChunkView<'a> {
    pub(crate) fn parse(frame: &'a [u8]) -> Result<ChunkView<'a>> {
        let bad = || Error::protocol("malformed chunk frame");
        let n_at = frame.len().checked_sub(8).ok_or_else(bad)?;
        let n = u64::from_le_bytes(frame[n_at..].try_into().map_err(|_| bad())?);
        let n = usize::try_from(n).map_err(|_| bad())?;
        let ends_at = n
            .checked_mul(8)
            .and_then(|b| n_at.checked_sub(b))
            .ok_or_else(bad)?;
        let view = ChunkView {
            data: &frame[..ends_at],
            ends: &frame[ends_at..n_at],
            n,
        };
        let mut prev = 0u64;
        for i in 0..n {
            let e = view.end(i);
            if e < prev || e > view.data.len() as u64 {
                return Err(bad());
            }
            prev = e;
        }
        Ok(view)
    }

    fn end(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.ends[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
    }

    pub(crate) fn len(&self) -> usize {
        self.n
    }

    pub(crate) fn item(&self, i: usize) -> &'a [u8] {
        let start = if i == 0 { 0 } else { self.end(i - 1) as usize };
        &self.data[start..self.end(i) as usize]
    }

    /// A new frame holding items `range` of this one.
    pub(crate) fn slice(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let mut b = ChunkBuilder::new();
        for i in range {
            b.push_raw(self.item(i));
        }
        b.finish()
    }
}

/// Why one item produced no value.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum TaskFailure {
    Panicked { message: String, location: String },
    Decode(String),
}

impl From<TaskFailure> for Error {
    fn from(f: TaskFailure) -> Error {
        match f {
            TaskFailure::Panicked { message, location } => Error::Panicked { message, location },
            TaskFailure::Decode(e) => Error::Serialization(e),
        }
    }
}

/// Runs one chunk; returns the encoded `Vec<Result<R, TaskFailure>>`.
pub(crate) type ChunkFn = fn(&[u8], &SharedPage, bool) -> Result<Vec<u8>>;
/// Runs the initializer with its encoded args.
pub(crate) type InitFn = fn(&[u8]) -> std::result::Result<(), TaskFailure>;

/// The offset identifying the chunk runner for targets of this type.
pub(crate) fn chunk_entry<F, A, M>() -> i64
where
    F: Target<A, M>,
    A: DeserializeOwned,
    F::Output: Serialize,
{
    const { target::assert_no_captures::<F>() };
    image::code_offset(run_chunk::<F, A, M> as ChunkFn as usize)
}

/// The offset identifying the initializer runner for targets of this type.
pub(crate) fn init_entry<F, A, M>() -> i64
where
    F: Target<A, M>,
    A: DeserializeOwned,
{
    const { target::assert_no_captures::<F>() };
    image::code_offset(run_init::<F, A, M> as InitFn as usize)
}

fn call_caught<F, A, M>(f: &F, a: A) -> std::result::Result<F::Output, TaskFailure>
where
    F: Target<A, M>,
{
    panic::catch_unwind(AssertUnwindSafe(|| f.call(a))).map_err(|p| {
        let (message, location) = target::panic_details(p);
        TaskFailure::Panicked { message, location }
    })
}

fn run_chunk<F, A, M>(frame: &[u8], page: &SharedPage, timed: bool) -> Result<Vec<u8>>
where
    F: Target<A, M>,
    A: DeserializeOwned,
    F::Output: Serialize,
{
    let items = ChunkView::parse(frame)?;
    // SAFETY: F is zero-sized (checked when the entry offset was taken) and the pool held
    // a value of it: a fn item or a closure without captures.
    let f: F = unsafe { image::conjure_zst::<F>() };
    let mut out: Vec<std::result::Result<F::Output, TaskFailure>> = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        page.slot(SLOT_ITEM).store(i as u64, Ordering::Relaxed);
        if timed {
            page.slot(SLOT_STARTED)
                .store(sysproc::monotonic_ns(), Ordering::Relaxed);
        }
        out.push(match postcard::from_bytes::<A>(items.item(i)) {
            Ok(a) => call_caught(&f, a),
            Err(e) => Err(TaskFailure::Decode(e.to_string())),
        });
    }
    postcard::to_allocvec(&out).map_err(Error::serialization)
}

fn run_init<F, A, M>(args: &[u8]) -> std::result::Result<(), TaskFailure>
where
    F: Target<A, M>,
    A: DeserializeOwned,
{
    let a: A = postcard::from_bytes(args).map_err(|e| TaskFailure::Decode(e.to_string()))?;
    // SAFETY: as in run_chunk.
    let f: F = unsafe { image::conjure_zst::<F>() };
    call_caught(&f, a).map(drop)
}

/// Pool → worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// Run a chunk: its frame follows.
    Chunk { seq: u64, entry: i64 },
    /// Finish and exit.
    Stop,
}

/// Worker → pool.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromWorker {
    /// The initializer ran; tasks are welcome.
    Ready,
    /// The initializer failed; the worker exits.
    InitFailed(String),
    /// A chunk ran: its results frame follows.
    Done { seq: u64 },
    /// A chunk could not be run at all (a malformed frame).
    ChunkFailed { seq: u64, error: String },
}

/// What a worker process receives.
#[derive(Serialize, Deserialize)]
pub(crate) struct WorkerArgs {
    pub conn: Connection,
    pub page: SharedPage,
    pub timed: bool,
    pub init: Option<(i64, Vec<u8>)>,
    pub max_tasks: Option<u64>,
}

/// A pool worker's whole life.
pub(crate) fn worker_main(args: WorkerArgs) {
    // Ctrl-C is for the parent to handle; a worker dies with its parent anyway.
    sysproc::set_signal_ignored(libc::SIGINT, true);
    target::quiet_panics();
    let WorkerArgs {
        conn,
        page,
        timed,
        init,
        max_tasks,
    } = args;
    if let Some((entry, bytes)) = init {
        // SAFETY: the offset comes from `init_entry` in our parent, which runs the same
        // build (checked when this child booted).
        let init: InitFn = unsafe { image::fn_at(entry) };
        if let Err(e) = init(&bytes) {
            let _ = conn.send(&FromWorker::InitFailed(Error::from(e).to_string()));
            return;
        }
    }
    if conn.send(&FromWorker::Ready).is_err() {
        return;
    }
    let mut done = 0u64;
    while let Ok(msg) = conn.recv::<ToWorker>() {
        let ToWorker::Chunk { seq, entry } = msg else {
            return;
        };
        let Ok(frame) = conn.recv_bytes() else { return };
        page.slot(SLOT_ITEM).store(0, Ordering::Relaxed);
        page.slot(SLOT_SEQ).store(seq, Ordering::Release);
        // SAFETY: as for the initializer: the offset comes from `chunk_entry` in our
        // parent, same build.
        let run: ChunkFn = unsafe { image::fn_at(entry) };
        let result = run(&frame, &page, timed);
        page.slot(SLOT_SEQ).store(0, Ordering::Release);
        let sent = match result {
            Ok(bytes) => conn
                .send(&FromWorker::Done { seq })
                .and_then(|()| conn.send_bytes(&bytes)),
            Err(e) => conn.send(&FromWorker::ChunkFailed {
                seq,
                error: e.to_string(),
            }),
        };
        if sent.is_err() {
            return;
        }
        done += 1;
        if max_tasks == Some(done) {
            return;
        }
    }
}
