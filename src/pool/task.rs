//! What travels between a pool and its workers: chunks of items, the entry functions that
//! run them, and the worker's main loop.
//!
//! A chunk's frame is `[item bytes…][end offset of each item: u64 LE…][item count: u64 LE]`:
//! items are encoded one by one so that a chunk can be split again (after a crash the
//! items that did not run are sent elsewhere) without decoding them.
#![allow(unsafe_code)]

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::reduction::SeqEncoder;
use crate::spawn::target::{self, Target};
use crate::sys::image;
use crate::sys::page::SharedPage;
use crate::sys::process as sysproc;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Slots of a worker's progress page.
pub(crate) const SLOT_SEQ: usize = 0; // the chunk being run (0: none)
pub(crate) const SLOT_ITEM: usize = 1; // index in that chunk of the item being run
pub(crate) const SLOT_STARTED: usize = 2; // CLOCK_MONOTONIC ns when that item started
/// A chunk the pool took back before it started (its result was dropped): the worker skips
/// it. At most one chunk waits behind the running one, so one slot is enough.
pub(crate) const SLOT_REVOKED: usize = 3;
/// The last chunk this worker finished (its result may still be held back: see
/// [`Outbox`]). Chunks run in the order they were sent, so every chunk sent up to this one
/// has run.
pub(crate) const SLOT_DONE: usize = 4;
/// How many bytes of results the worker holds back in the page's outbox (see
/// [`Outbox`]): what the pool recovers from a worker that died holding them.
const SLOT_HELD: usize = 5;
/// Where the outbox starts in the page: past the first eight slots.
const OUTBOX_START: usize = 64;
/// The most bytes of held results, with a 4-byte length before each.
const OUTBOX_CAP: usize = crate::sys::page::PAGE - OUTBOX_START;

/// The results a dead worker held back, from its progress page: each a message as it
/// would have come through the socket. Frames are checked against the outbox's bounds;
/// the list ends at the first that does not fit. The worker must have exited (nothing
/// writes the page any more).
pub(crate) fn held_results(page: &SharedPage) -> Vec<Vec<u8>> {
    let len = (page.slot(SLOT_HELD).load(Ordering::Acquire) as usize).min(OUTBOX_CAP);
    let bytes = page.read_bytes(OUTBOX_START, len);
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while let Some((head, tail)) = rest.split_first_chunk::<4>() {
        let n = u32::from_le_bytes(*head) as usize;
        if n > tail.len() {
            break;
        }
        out.push(tail[..n].to_vec());
        rest = &tail[n..];
    }
    out
}

/// Items encoded one by one, in a frame ready to send.
///
/// A chunk frame is the items' bytes, one after the other, then how to find them: either
/// where each item ends (`[end: u64 LE]` per item, counted from the frame's start) and
/// then the count `[n: u64 LE]`; or, when every item took the same number of bytes (a
/// chunk of `i64`s, of fixed-size structs), only that size `[size: u64 LE]` and then
/// `[n | UNIFORM: u64 LE]`, which halves a chunk of small numbers and makes finding an
/// item a multiplication.
pub(crate) struct ChunkBuilder {
    data: SeqEncoder,
    /// Where each item ends; empty while every item has had the same size.
    ends: Vec<u64>,
    /// How many items.
    n: usize,
    /// The size every item has had so far (`None` before the first, and once sizes
    /// differ: then `ends` holds every item's end).
    uniform: Option<u64>,
}

/// Set in a chunk frame's count when its items all have one size (see [`ChunkBuilder`]).
const UNIFORM: u64 = 1 << 63;

impl ChunkBuilder {
    /// The frame starts with room for the message prefix ([`TO_WORKER_PREFIX`] bytes),
    /// filled in when it is sent, so that the chunk goes out as one message, uncopied.
    pub(crate) fn new() -> Self {
        ChunkBuilder {
            data: SeqEncoder::new(vec![0; TO_WORKER_PREFIX]),
            ends: Vec::new(),
            n: 0,
            uniform: None,
        }
    }

    /// A builder with room for `items` items of about `item_size` bytes each, which
    /// reuses the memory of `data` and `ends` (buffers of earlier chunks, or empty).
    pub(crate) fn reusing(
        mut data: Vec<u8>,
        mut ends: Vec<u64>,
        items: usize,
        item_size: usize,
    ) -> Self {
        data.clear();
        ends.clear();
        data.reserve(TO_WORKER_PREFIX + items.saturating_mul(item_size + 8).min(64 << 20));
        data.resize(TO_WORKER_PREFIX, 0);
        ChunkBuilder {
            data: SeqEncoder::new(data),
            ends,
            n: 0,
            uniform: None,
        }
    }

    /// Where the next item starts, counted from the end of the prefix.
    fn offset(&mut self) -> u64 {
        (self.data.bytes().len() - TO_WORKER_PREFIX) as u64
    }

    pub(crate) fn push<A: Serialize>(&mut self, item: &A) -> Result<()> {
        self.data.push(item)?;
        self.ended();
        Ok(())
    }

    pub(crate) fn push_raw(&mut self, bytes: &[u8]) {
        self.data.bytes().extend_from_slice(bytes);
        self.ended();
    }

    /// An item was just written. Inlined: for a chunk of one-size items (numbers), this
    /// is a comparison per item, and the rest stays out of the encoding loop.
    #[inline]
    fn ended(&mut self) {
        let end = self.offset();
        let n = self.n as u64;
        self.n += 1;
        match self.uniform {
            Some(size) if end == size * (n + 1) => {}
            _ => self.ended_otherwise(n, end),
        }
    }

    /// [`ended`](Self::ended) for the first item, items of another size, and chunks
    /// that keep every end.
    #[cold]
    #[inline(never)]
    fn ended_otherwise(&mut self, n: u64, end: u64) {
        match self.uniform {
            // Items of no bytes keep their ends: a count of them is bounded by the
            // frame's length only that way.
            None if n == 0 && end > 0 => self.uniform = Some(end),
            Some(size) => {
                // The first item of another size: from here on, every end is kept.
                self.uniform = None;
                self.ends.reserve(self.n);
                self.ends.extend((1..=n).map(|k| k * size));
                self.ends.push(end);
            }
            None => self.ends.push(end),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// The whole message: prefix (to be filled by [`set_chunk_prefix`]) and chunk frame.
    pub(crate) fn finish(self) -> Vec<u8> {
        self.finish_reusing().0
    }

    /// Like [`finish`](Self::finish), and hands back the offsets buffer for reuse.
    pub(crate) fn finish_reusing(self) -> (Vec<u8>, Vec<u64>) {
        let mut data = self.data.into_inner();
        let n = self.n as u64;
        match self.uniform {
            Some(size) => {
                data.extend_from_slice(&size.to_le_bytes());
                data.extend_from_slice(&(n | UNIFORM).to_le_bytes());
            }
            None => {
                data.reserve(self.ends.len() * 8 + 8);
                for e in &self.ends {
                    data.extend_from_slice(&e.to_le_bytes());
                }
                data.extend_from_slice(&n.to_le_bytes());
            }
        }
        (data, self.ends)
    }
}

/// Encodes up to `max` (at least one) items of `iter` as one chunk frame, in the memory
/// of `spare` and with `ends` as the offset buffer (handed back empty, for reuse); the
/// chunk ends early once its items take `max_bytes`. `(count, frame)`, or
/// `(count, error)` if an item could not be encoded (the chunk's `count` items are all
/// pulled all the same); `None` once `iter` is exhausted.
pub(crate) fn encode_chunk<T: Serialize>(
    iter: &mut impl Iterator<Item = T>,
    max: usize,
    max_bytes: usize,
    spare: Vec<u8>,
    ends: &mut Vec<u64>,
) -> Option<(u64, Result<Vec<u8>>)> {
    let mut b = ChunkBuilder::reusing(
        spare,
        std::mem::take(ends),
        max.max(1),
        std::mem::size_of::<T>() + 1,
    );
    let mut err = None;
    let mut n = 0u64;
    for item in iter.by_ref().take(max.max(1)) {
        n += 1;
        if err.is_none() {
            if let Err(e) = b.push(&item) {
                err = Some(e);
            }
        }
        if b.data.bytes().len() >= max_bytes {
            break;
        }
    }
    if n == 0 {
        return None;
    }
    debug_assert!(err.is_some() || b.len() as u64 == n);
    Some((
        n,
        match err {
            Some(e) => Err(e),
            None => {
                let (frame, reused) = b.finish_reusing();
                *ends = reused;
                Ok(frame)
            }
        },
    ))
}

/// An item that is encoded as the `A` it borrows as: the pool's inputs may be `A`s
/// themselves or anything that [`Borrow`]s one (`&A`, `Box<A>`, `Arc<A>`, …), and are
/// encoded straight from the borrow.
pub(crate) struct AsBorrowed<T, A: ?Sized>(T, PhantomData<fn() -> *const A>);

impl<T, A: ?Sized> AsBorrowed<T, A> {
    pub(crate) fn new(item: T) -> Self {
        AsBorrowed(item, PhantomData)
    }
}

impl<T: Borrow<A>, A: Serialize + ?Sized> Serialize for AsBorrowed<T, A> {
    #[inline]
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.borrow().serialize(s)
    }
}

/// Pool → worker messages start with `[tag u8][seq u64 LE][entry i64 LE]`.
pub(crate) const TO_WORKER_PREFIX: usize = 17;
/// Worker → pool messages start with `[tag u8][seq u64 LE]`.
pub(crate) const FROM_WORKER_PREFIX: usize = 9;

const TAG_CHUNK: u8 = 1;
const TAG_STOP: u8 = 2;
const TAG_READY: u8 = 1;
const TAG_INIT_FAILED: u8 = 2;
const TAG_DONE: u8 = 3;
const TAG_CHUNK_FAILED: u8 = 4;

/// Fills in the prefix of a chunk message made by [`ChunkBuilder::finish`].
pub(crate) fn set_chunk_prefix(msg: &mut [u8], seq: u64, entry: i64) {
    msg[0] = TAG_CHUNK;
    msg[1..9].copy_from_slice(&seq.to_le_bytes());
    msg[9..17].copy_from_slice(&entry.to_le_bytes());
}

/// The message that tells a worker to finish.
pub(crate) fn stop_message() -> Vec<u8> {
    let mut m = vec![0; TO_WORKER_PREFIX];
    m[0] = TAG_STOP;
    m
}

/// The chunk frame inside a chunk message.
pub(crate) fn chunk_of(msg: &[u8]) -> &[u8] {
    msg.get(TO_WORKER_PREFIX..).unwrap_or(&[])
}

/// A message from a worker, decoded.
#[derive(Debug)]
pub(crate) enum FromWorker<'a> {
    /// The initializer ran; tasks are welcome.
    Ready,
    /// The initializer failed; the worker exits.
    InitFailed(String),
    /// A chunk ran: the encoded results.
    Done { seq: u64, results: &'a [u8] },
    /// A chunk could not be run at all (a malformed frame).
    ChunkFailed { seq: u64, error: String },
}

impl<'a> FromWorker<'a> {
    pub(crate) fn parse(msg: &'a [u8]) -> Result<FromWorker<'a>> {
        if msg.len() < FROM_WORKER_PREFIX {
            return Err(Error::protocol("short message from a pool worker"));
        }
        let seq = u64::from_le_bytes(msg[1..9].try_into().expect("8 bytes"));
        let body = &msg[FROM_WORKER_PREFIX..];
        let text = || String::from_utf8_lossy(body).into_owned();
        Ok(match msg[0] {
            TAG_READY => FromWorker::Ready,
            TAG_INIT_FAILED => FromWorker::InitFailed(text()),
            TAG_DONE => FromWorker::Done { seq, results: body },
            TAG_CHUNK_FAILED => FromWorker::ChunkFailed { seq, error: text() },
            t => {
                return Err(Error::protocol(format!(
                    "unknown message {t} from a pool worker"
                )))
            }
        })
    }
}

fn worker_message(tag: u8, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(FROM_WORKER_PREFIX + body.len());
    m.push(tag);
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// A parsed chunk frame (see [`ChunkBuilder`] for its layout).
pub(crate) struct ChunkView<'a> {
    data: &'a [u8],
    ends: &'a [u8],
    n: usize,
    /// Every item's size, when they all have one (then `ends` is empty).
    size: Option<usize>,
}

impl<'a> ChunkView<'a> {
    pub(crate) fn parse(frame: &'a [u8]) -> Result<ChunkView<'a>> {
        let bad = || Error::protocol("malformed chunk frame");
        let n_at = frame.len().checked_sub(8).ok_or_else(bad)?;
        let word = |at: usize| u64::from_le_bytes(frame[at..at + 8].try_into().expect("8"));
        let n = word(n_at);
        if n & UNIFORM != 0 {
            let n = usize::try_from(n & !UNIFORM).map_err(|_| bad())?;
            let size_at = n_at.checked_sub(8).ok_or_else(bad)?;
            let size = usize::try_from(word(size_at)).map_err(|_| bad())?;
            // The items fill the data exactly, and take a byte each at least (the count
            // is bounded by what arrived).
            if size == 0 || n.checked_mul(size) != Some(size_at) {
                return Err(bad());
            }
            return Ok(ChunkView {
                data: &frame[..size_at],
                ends: &[],
                n,
                size: Some(size),
            });
        }
        let n = usize::try_from(n).map_err(|_| bad())?;
        let ends_at = n
            .checked_mul(8)
            .and_then(|b| n_at.checked_sub(b))
            .ok_or_else(bad)?;
        let view = ChunkView {
            data: &frame[..ends_at],
            ends: &frame[ends_at..n_at],
            n,
            size: None,
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

    /// Item `i` (< [`len`](Self::len)). Inlined into the worker's loop: for one-size
    /// items it is a multiplication.
    #[inline]
    pub(crate) fn item(&self, i: usize) -> &'a [u8] {
        if let Some(size) = self.size {
            return &self.data[i * size..(i + 1) * size];
        }
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

/// Writes a chunk's results: `[count: u64][value of each item that succeeded, in item
/// order…][failures: Vec<(position, TaskFailure)>][offset of the failures: u64 LE]`, after
/// whatever the buffer held (the message prefix). Values carry no per-item tag, so the
/// common all-succeeded chunk decodes as a plain sequence.
pub(crate) struct ResultsWriter {
    enc: SeqEncoder,
    base: usize,
    next: u64,
    failures: Vec<(u64, TaskFailure)>,
}

impl ResultsWriter {
    pub(crate) fn new(buf: Vec<u8>, count: usize) -> Result<Self> {
        let base = buf.len();
        let mut enc = SeqEncoder::new(buf);
        enc.push(&(count as u64))?;
        Ok(ResultsWriter {
            enc,
            base,
            next: 0,
            failures: Vec::new(),
        })
    }

    /// The next item's value.
    pub(crate) fn push_ok<R: Serialize>(&mut self, value: &R) -> Result<()> {
        self.next += 1;
        self.enc.push(value)
    }

    /// The next item failed.
    pub(crate) fn push_failure(&mut self, failure: TaskFailure) {
        self.failures.push((self.next, failure));
        self.next += 1;
    }

    pub(crate) fn finish(mut self) -> Result<Vec<u8>> {
        let at = (self.enc.bytes().len() - self.base) as u64;
        self.enc.push(&self.failures)?;
        let mut out = self.enc.into_inner();
        out.extend_from_slice(&at.to_le_bytes());
        Ok(out)
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
        let e = match f {
            TaskFailure::Panicked { message, location } => Error::Panicked { message, location },
            TaskFailure::Decode(e) => Error::Serialization(e),
        };
        // MPI hook: a failure in results relayed by an agent names the agent's host.
        #[cfg(feature = "mpi")]
        let e = super::mpi::tag_remote(e);
        e
    }
}

/// Runs one chunk; returns the `Done` message: prefix, then the results as
/// [`ResultsWriter`] lays them out.
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
    // The results are encoded as they come (no intermediate vector of results).
    let mut msg = Vec::with_capacity(
        FROM_WORKER_PREFIX + 16 + items.len() * (std::mem::size_of::<F::Output>() + 2),
    );
    msg.resize(FROM_WORKER_PREFIX, 0);
    msg[0] = TAG_DONE;
    let mut msg = ResultsWriter::new(msg, items.len())?;
    let (item_slot, started_slot) = (page.slot(SLOT_ITEM), page.slot(SLOT_STARTED));
    for i in 0..items.len() {
        item_slot.store(i as u64, Ordering::Relaxed);
        if timed {
            started_slot.store(sysproc::monotonic_ns(), Ordering::Relaxed);
        }
        let r = match crate::reduction::decode_exact::<A>(items.item(i)) {
            Ok(a) => call_caught(&f, a),
            Err(e) => Err(TaskFailure::Decode(e.to_string())),
        };
        match r {
            Ok(v) => msg.push_ok(&v).map_err(|e| {
                Error::Serialization(format!("could not encode the result of item {i}: {e}"))
            })?,
            Err(failure) => msg.push_failure(failure),
        }
    }
    msg.finish()
}

fn run_init<F, A, M>(args: &[u8]) -> std::result::Result<(), TaskFailure>
where
    F: Target<A, M>,
    A: DeserializeOwned,
{
    let a: A =
        crate::reduction::decode_exact(args).map_err(|e| TaskFailure::Decode(e.to_string()))?;
    // SAFETY: as in run_chunk.
    let f: F = unsafe { image::conjure_zst::<F>() };
    call_caught(&f, a).map(drop)
}

/// What a worker process receives.
#[derive(Serialize, Deserialize)]
pub(crate) struct WorkerArgs {
    pub conn: Connection,
    pub page: SharedPage,
    pub timed: bool,
    pub init: Option<(i64, Vec<u8>)>,
    /// Run when the worker exits normally ([`super::PoolBuilder::finalizer`]).
    pub fin: Option<(i64, Vec<u8>)>,
    pub max_tasks: Option<u64>,
    /// Its slot in the pool ([`super::worker_id`]).
    pub slot: usize,
}

/// This process's worker slot, once it runs as a pool worker (`usize::MAX`: not one).
static WORKER_SLOT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(usize::MAX);

/// See [`super::worker_id`].
pub(crate) fn worker_slot() -> Option<usize> {
    match WORKER_SLOT.load(Ordering::Relaxed) {
        usize::MAX => None,
        s => Some(s),
    }
}

/// Runs an initializer or finalizer given as `(entry, encoded args)`.
fn run_hook((entry, bytes): &(i64, Vec<u8>)) -> Result<()> {
    // SAFETY: the offset comes from `init_entry` in our parent, which runs the same
    // build (checked when this child booted).
    unsafe { target::resolve::<InitFn>(*entry) }.and_then(|f| f(bytes).map_err(Error::from))
}

/// Runs the chunk in a pool → worker chunk message with the entry it names; the `Done`
/// message, or an error if the entry is not in this program's code or the chunk is
/// malformed.
fn run_chunk_message(msg: &[u8], page: &SharedPage, timed: bool) -> Result<Vec<u8>> {
    let entry = i64::from_le_bytes(msg[9..17].try_into().expect("8 bytes"));
    // SAFETY: the offset comes from `chunk_entry` in our parent, which runs the same
    // build (checked when this child booted).
    let run = unsafe { target::resolve::<ChunkFn>(entry) }?;
    run(chunk_of(msg), page, timed)
}

/// A pool worker's whole life.
pub(crate) fn worker_main(args: WorkerArgs) {
    // Ctrl-C is for the parent to handle; a worker dies with its parent anyway.
    sysproc::set_signal_ignored(libc::SIGINT, true);
    target::quiet_panics();
    sysproc::keep_freed_memory();
    let WorkerArgs {
        conn,
        page,
        timed,
        init,
        fin,
        max_tasks,
        slot,
    } = args;
    WORKER_SLOT.store(slot, Ordering::Relaxed);
    if let Some(init) = &init {
        if let Err(e) = run_hook(init) {
            let _ = conn.send_bytes(&worker_message(
                TAG_INIT_FAILED,
                0,
                e.to_string().as_bytes(),
            ));
            return;
        }
    }
    if conn.send_bytes(&worker_message(TAG_READY, 0, &[])).is_err() {
        return;
    }
    serve(&conn, &page, timed, max_tasks);
    // A normal exit (stopped, retired, or the pool went away): the finalizer runs. Its
    // failure is reported as a panic would be, on stderr; the worker exits either way.
    if let Some(fin) = &fin {
        if let Err(e) = run_hook(fin) {
            eprintln!("multiprocess: the pool's finalizer failed: {e}");
        }
    }
}

/// How many finished chunks' results a worker holds back at most, to send them with the
/// next ones: half of what the pool pipelines to it, so that its next chunks arrive
/// while it runs the rest. Their bytes are limited by the outbox ([`OUTBOX_CAP`]).
const HOLD_MAX: usize = super::dispatcher::PIPELINE_DEPTH / 2;
/// How long a held result may wait: after this the worker's flusher thread sends it,
/// whatever the worker is running (a fast item's result never waits behind a long or
/// blocked one). Only chunks that ran for less than this are held.
const HOLD_FOR: Duration = Duration::from_micros(500);
/// How many idle periods of [`HOLD_FOR`] the flusher keeps looking before it sleeps
/// until the next result is held.
const FLUSHER_IDLE_ROUNDS: u32 = 20;

/// How long a worker looks for its next chunk (yielding between looks) before it sleeps.
/// Calls made one after another (an `apply_async(..).get()` loop) send the next chunk
/// within a round trip, a few tens of µs; a worker that slept meanwhile would first have
/// to be woken, which on a virtual machine whose CPU went idle costs 20–40 µs, as much
/// again. An idle pool's workers spin this long once, after their last chunk.
const WORKER_SPIN: Duration = Duration::from_micros(50);

/// Results held back by a worker, and whether its flusher thread sleeps.
#[derive(Default)]
struct Held {
    frames: Vec<Vec<u8>>,
    /// Bytes of the outbox in use: the held frames, each after its 4-byte length.
    bytes: usize,
    /// When the oldest held result was finished.
    since: Option<Instant>,
    flusher_asleep: bool,
    started: bool,
    closed: bool,
    /// A send failed: the pool is gone.
    failed: bool,
}

/// A worker's way back to the pool: results go out at once, or are held back while more
/// work is already waiting in the worker's socket and sent together, by the worker when
/// its input runs dry or the batch is full, or by the flusher thread when the oldest has
/// waited [`HOLD_FOR`].
///
/// A held result is not lost if the worker dies: besides keeping it to send, the worker
/// copies it into the outbox of its progress page (after the slots, up to [`SLOT_HELD`]
/// bytes), from where the pool takes what did not arrive through the socket (see
/// [`held_results`] and `Dispatcher::worker_died`); the outbox is emptied once a send
/// succeeds. The worker records each chunk as finished ([`SLOT_DONE`]) before that, so
/// the pool never runs a finished chunk again, even one that died between the two.
struct Outbox<'c> {
    conn: &'c Connection,
    page: &'c SharedPage,
    held: Mutex<Held>,
    wake: Condvar,
}

fn lock(m: &Mutex<Held>) -> MutexGuard<'_, Held> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Outbox<'_> {
    /// Sends what is held (under the lock: the flusher and the worker never interleave).
    fn flush_locked(&self, h: &mut Held) -> Result<()> {
        h.since = None;
        h.bytes = 0;
        if h.frames.is_empty() {
            return Ok(());
        }
        let frames: Vec<&[u8]> = h.frames.iter().map(|f| &f[..]).collect();
        let sent = self.conn.send_frames(&frames);
        drop(frames);
        h.frames.clear();
        if sent.is_err() {
            // The pool is gone, or will find the results in the outbox.
            h.failed = true;
        } else {
            self.page.slot(SLOT_HELD).store(0, Ordering::Release);
        }
        sent
    }

    /// Sends what is held and then `msg`, in one write where the socket allows.
    fn send(&self, msg: Vec<u8>) -> Result<()> {
        let mut h = lock(&self.held);
        if h.failed {
            return Err(Error::Eof);
        }
        if h.frames.is_empty() {
            return self.conn.send_bytes(&msg);
        }
        h.frames.push(msg);
        self.flush_locked(&mut h)
    }

    /// Holds `msg` back. Returns whether the flusher thread must be started.
    fn hold(&self, msg: Vec<u8>) -> Result<bool> {
        let mut h = lock(&self.held);
        if h.failed {
            return Err(Error::Eof);
        }
        // Into the outbox first: from the moment the length says so, the pool can recover
        // it.
        let at = h.bytes;
        self.page
            .write_bytes(OUTBOX_START + at, &(msg.len() as u32).to_le_bytes());
        self.page.write_bytes(OUTBOX_START + at + 4, &msg);
        h.bytes += 4 + msg.len();
        self.page
            .slot(SLOT_HELD)
            .store(h.bytes as u64, Ordering::Release);
        h.frames.push(msg);
        if h.closed {
            // No flusher thread could be started: nothing waits.
            return self.flush_locked(&mut h).map(|()| false);
        }
        if h.since.is_none() {
            h.since = Some(Instant::now());
            if h.flusher_asleep {
                self.wake.notify_one();
            }
        }
        let start = !h.started;
        h.started = true;
        Ok(start)
    }

    /// Whether a result of `len` bytes cannot be held with the others.
    fn is_full(&self, len: usize) -> bool {
        let h = lock(&self.held);
        h.frames.len() >= HOLD_MAX || h.bytes + 4 + len > OUTBOX_CAP
    }

    /// Sends what is held and stops the flusher.
    fn close(&self) {
        let mut h = lock(&self.held);
        if !h.failed {
            let _ = self.flush_locked(&mut h);
        }
        h.closed = true;
        self.wake.notify_one();
    }

    /// The flusher thread: sends held results that have waited [`HOLD_FOR`].
    fn flusher(&self) {
        let mut h = lock(&self.held);
        let mut idle = 0;
        while !h.closed {
            match h.since {
                Some(t) => {
                    idle = 0;
                    let due = t + HOLD_FOR;
                    let now = Instant::now();
                    if now >= due {
                        let _ = self.flush_locked(&mut h);
                    } else {
                        h = self
                            .wake
                            .wait_timeout(h, due - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
                None if idle < FLUSHER_IDLE_ROUNDS => {
                    idle += 1;
                    h = self
                        .wake
                        .wait_timeout(h, HOLD_FOR)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                None => {
                    h.flusher_asleep = true;
                    h = self.wake.wait(h).unwrap_or_else(|p| p.into_inner());
                    h.flusher_asleep = false;
                    idle = 0;
                }
            }
        }
    }
}

/// A worker's loop: runs chunks until it is told to stop, has run `max_tasks`, or loses
/// its pool.
fn serve(conn: &Connection, page: &SharedPage, timed: bool, max_tasks: Option<u64>) {
    let out = Outbox {
        conn,
        page,
        held: Mutex::new(Held::default()),
        wake: Condvar::new(),
    };
    std::thread::scope(|scope| {
        serve_with(&out, scope, page, timed, max_tasks);
        out.close();
    });
}

fn serve_with<'s, 'c>(
    out: &'s Outbox<'c>,
    scope: &'s std::thread::Scope<'s, '_>,
    page: &SharedPage,
    timed: bool,
    max_tasks: Option<u64>,
) {
    let conn = out.conn;
    let mut done = 0u64;
    let mut msg = Vec::new();
    loop {
        // Look for the next chunk before sleeping (see WORKER_SPIN). No result waits on
        // this: a worker holds results back only when its next chunk is already waiting,
        // and then the look ends at once.
        if !conn.has_buffered() {
            let _ = crate::sys::fd::readable_within(std::os::fd::AsFd::as_fd(conn), WORKER_SPIN);
        }
        if conn.recv_bytes_reusing(&mut msg).is_err() {
            break;
        }
        if msg.len() < TO_WORKER_PREFIX || msg[0] != TAG_CHUNK {
            return;
        }
        let seq = u64::from_le_bytes(msg[1..9].try_into().expect("8 bytes"));
        page.slot(SLOT_ITEM).store(0, Ordering::Relaxed);
        // When the chunk started: per-task timeouts (`Pool::schedule`) time a chunk of one
        // item from here; a pool-wide timeout also stamps each item.
        let started = sysproc::monotonic_ns();
        page.slot(SLOT_STARTED).store(started, Ordering::Relaxed);
        page.slot(SLOT_SEQ).store(seq, Ordering::SeqCst);
        // Paired with the pool's store of SLOT_REVOKED then load of SLOT_SEQ: either it
        // sees this chunk started, or we see it revoked.
        let reply = if page.slot(SLOT_REVOKED).load(Ordering::SeqCst) == seq {
            worker_message(TAG_CHUNK_FAILED, seq, b"revoked before it started")
        } else {
            match run_chunk_message(&msg, page, timed) {
                Ok(mut reply) => {
                    reply[1..9].copy_from_slice(&seq.to_le_bytes());
                    done += 1;
                    reply
                }
                Err(e) => {
                    done += 1;
                    worker_message(TAG_CHUNK_FAILED, seq, e.to_string().as_bytes())
                }
            }
        };
        // Finished: recorded before the chunk stops being the running one, so that a
        // death from here on never takes it for one that did not run.
        page.slot(SLOT_DONE).store(seq, Ordering::Release);
        page.slot(SLOT_SEQ).store(0, Ordering::Release);
        let last = max_tasks == Some(done);
        // Hold the result back if more work is already waiting and this chunk was quick:
        // it goes out with the next ones.
        let quick = sysproc::monotonic_ns().saturating_sub(started) < HOLD_FOR.as_nanos() as u64;
        let sent = if !last && quick && !out.is_full(reply.len()) && more_input(conn) {
            match out.hold(reply) {
                Ok(true) => {
                    let spawned = std::thread::Builder::new()
                        .name("pool-flusher".into())
                        .stack_size(64 * 1024)
                        .spawn_scoped(scope, || out.flusher());
                    if spawned.is_err() {
                        // No thread: nothing is held any more.
                        let mut h = lock(&out.held);
                        h.closed = true;
                        out.flush_locked(&mut h)
                    } else {
                        Ok(())
                    }
                }
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            out.send(reply)
        };
        if sent.is_err() || last {
            return;
        }
    }
}

/// Whether more work already waits for the worker: read ahead with the last chunk (the
/// pool sends a worker's chunks in one write). No system call: a lone call's result is
/// sent at once, without a `poll` first.
fn more_input(conn: &Connection) -> bool {
    conn.has_buffered()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_items_encode_as_owned_ones_and_big_ones_end_a_chunk() {
        let bufs: Vec<Vec<u8>> = vec![
            vec![1; 10],
            vec![2; 600 << 10],
            vec![3; 600 << 10],
            vec![4; 5],
        ];
        let encode = |max_bytes| {
            let mut it = bufs.iter().map(AsBorrowed::<_, Vec<u8>>::new);
            let mut ends = Vec::new();
            std::iter::from_fn(|| encode_chunk(&mut it, 3, max_bytes, Vec::new(), &mut ends))
                .map(|(n, frame)| (n, frame.unwrap()))
                .collect::<Vec<_>>()
        };
        // By count only: chunks of 3 and 1, each item encoded as the Vec<u8> it borrows.
        let chunks = encode(usize::MAX);
        assert_eq!(chunks.iter().map(|c| c.0).collect::<Vec<_>>(), [3, 1]);
        let view = ChunkView::parse(chunk_of(&chunks[0].1)).unwrap();
        for (i, b) in bufs[..3].iter().enumerate() {
            assert_eq!(
                view.item(i),
                crate::reduction::encode_append(b, Vec::new()).unwrap()
            );
        }
        // With a 1 MiB budget the chunk ends after the item that crosses it.
        let chunks = encode(1 << 20);
        assert_eq!(chunks.iter().map(|c| c.0).collect::<Vec<_>>(), [3, 1]);
        let chunks = encode(512 << 10);
        assert_eq!(chunks.iter().map(|c| c.0).collect::<Vec<_>>(), [2, 1, 1]);
    }

    #[test]
    fn chunk_frames_round_trip_and_split() {
        let mut b = ChunkBuilder::new();
        for i in 0..5u64 {
            b.push(&(i * 1000)).unwrap();
        }
        let mut msg = b.finish();
        set_chunk_prefix(&mut msg, 7, -3);
        let view = ChunkView::parse(chunk_of(&msg)).unwrap();
        assert_eq!(view.len(), 5);
        for i in 0..5 {
            assert_eq!(
                crate::reduction::decode_exact::<u64>(view.item(i)).unwrap(),
                i as u64 * 1000
            );
        }
        let part = view.slice(2..4);
        let v2 = ChunkView::parse(chunk_of(&part)).unwrap();
        assert_eq!(v2.len(), 2);
        assert_eq!(
            crate::reduction::decode_exact::<u64>(v2.item(1)).unwrap(),
            3000
        );
    }

    #[test]
    fn a_chunk_naming_a_bogus_entry_is_a_clean_error() {
        fn double(x: u64) -> u64 {
            x * 2
        }
        fn entry_of<F, A, M>(_: &F) -> i64
        where
            F: Target<A, M>,
            A: DeserializeOwned,
            F::Output: Serialize,
        {
            chunk_entry::<F, A, M>()
        }
        let page = SharedPage::new().unwrap();
        let mut b = ChunkBuilder::new();
        b.push(&21u64).unwrap();
        let mut msg = b.finish();
        let good = entry_of(&double);
        set_chunk_prefix(&mut msg, 1, good);
        assert!(run_chunk_message(&msg, &page, false).is_ok());
        for bogus in [i64::MAX, i64::MIN, good.wrapping_add(1 << 40)] {
            set_chunk_prefix(&mut msg, 1, bogus);
            let e = run_chunk_message(&msg, &page, false).unwrap_err();
            assert!(matches!(e, Error::Protocol(_)), "{e}");
            assert!(e.to_string().contains("outside this program's code"), "{e}");
        }
    }

    /// Items of one size are found by their size, without a table of ends; a chunk
    /// whose sizes differ, even only from its fourth item on, keeps every end.
    #[test]
    fn uniform_and_mixed_chunks_round_trip() {
        let decode = |view: &ChunkView<'_>, i| {
            crate::reduction::decode_exact::<String>(view.item(i)).unwrap()
        };
        let words = ["abc", "def", "ghi", "jk", "", "lmnop"];
        for n in 1..=words.len() {
            let mut b = ChunkBuilder::new();
            for w in &words[..n] {
                b.push(&w.to_string()).unwrap();
            }
            assert_eq!(b.len(), n);
            let msg = b.finish();
            let frame = chunk_of(&msg);
            let view = ChunkView::parse(frame).unwrap();
            assert_eq!(view.len(), n);
            let data: usize = (0..n).map(|i| view.item(i).len()).sum();
            if n <= 3 {
                assert_eq!(frame.len(), data + 16, "{n} items of one size");
            } else {
                assert_eq!(frame.len(), data + 8 * n + 8, "{n} items");
            }
            for (i, w) in words[..n].iter().enumerate() {
                assert_eq!(decode(&view, i), *w);
            }
            // A slice of it is a chunk of its own, either way.
            let part = view.slice(n / 2..n);
            let v2 = ChunkView::parse(chunk_of(&part)).unwrap();
            for (i, w) in words[n / 2..n].iter().enumerate() {
                assert_eq!(decode(&v2, i), *w);
            }
        }
        // Items of no bytes at all.
        let mut b = ChunkBuilder::new();
        for _ in 0..4 {
            b.push(&()).unwrap();
        }
        let msg = b.finish();
        let view = ChunkView::parse(chunk_of(&msg)).unwrap();
        assert_eq!((view.len(), view.item(3).len()), (4, 0));
        assert_eq!(
            chunk_of(&msg).len(),
            4 * 8 + 8,
            "zero-size items keep their ends"
        );
    }

    #[test]
    fn malformed_chunk_frames_are_errors() {
        let uniform = |data: usize, size: u64, n: u64| {
            let mut f = vec![0u8; data];
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&(n | UNIFORM).to_le_bytes());
            f
        };
        assert!(ChunkView::parse(&uniform(16, 8, 2)).is_ok());
        for bad in [
            &[][..],
            &[1, 2, 3],
            &[0xff; 8],
            &[0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0],
            // Items of one size that do not fill the data, or overflow it.
            &uniform(16, 8, 3),
            &uniform(16, 8, 1),
            &uniform(16, u64::MAX, 2),
            &uniform(16, 1 << 61, 8),
            &uniform(0, 0, u64::MAX >> 1)[8..],
            // Endless items of no bytes.
            &uniform(0, 0, u64::MAX >> 1),
            &uniform(0, 0, 5),
            &UNIFORM.to_le_bytes(),
        ] {
            assert!(ChunkView::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// The pool reads a dead worker's outbox as bytes another process wrote: a length
    /// past the end, or a counter past the outbox, ends the list; nothing panics.
    #[test]
    fn held_results_are_read_within_bounds() {
        let page = SharedPage::new().unwrap();
        let out = |frames: &[&[u8]], counter: u64| {
            let mut at = OUTBOX_START;
            for f in frames {
                page.write_bytes(at, f);
                at += f.len();
            }
            page.slot(SLOT_HELD).store(counter, Ordering::Release);
            held_results(&page)
        };
        let two = [
            &3u32.to_le_bytes()[..],
            b"abc",
            &1u32.to_le_bytes()[..],
            b"z",
        ];
        assert_eq!(out(&two, 12), vec![b"abc".to_vec(), b"z".to_vec()]);
        // The counter covers only the first frame.
        assert_eq!(out(&two, 7), vec![b"abc".to_vec()]);
        // A length past what the counter covers, then one past the page.
        let long = [&9u32.to_le_bytes()[..], b"abc"];
        assert!(out(&long, 7).is_empty());
        let huge = [&u32::MAX.to_le_bytes()[..]];
        assert!(out(&huge, u64::MAX).is_empty());
        assert!(out(&[], 0).is_empty());
    }
}
