//! Where results land: `AsyncResult` for one value (or one `Vec`), the lazy iterators of
//! `imap`/`imap_unordered`, and the sinks through which the dispatcher fills them.

use super::task::TaskFailure;
use crate::error::{Error, Result};
use crate::reduction::SeqDecoder;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How the dispatcher hands results to a job, whatever their type.
pub(crate) trait Sink: Send {
    /// Results of items `start..start+n`, as [`ResultsWriter`](super::task::ResultsWriter) lays them out.
    /// Returns how many items that was.
    fn deliver(&mut self, start: u64, results: &[u8]) -> Result<u64>;
    /// Item `index` failed.
    fn fail(&mut self, index: u64, error: Error);
    /// Every item has been delivered or failed.
    fn finish(&mut self);
    /// The job ends early (cancelled, pool terminated): everything missing fails.
    fn abort(&mut self, error: Error);
    /// Hands over what [`deliver`](Self::deliver) kept back: the dispatcher calls this once
    /// per round, so that a consumer is woken once per batch of results rather than once
    /// per item.
    fn flush(&mut self) {}
}

/// Decodes a chunk's results (see [`super::task::ResultsWriter`] for the layout): the
/// values of the items that succeeded are pushed to `values` in item order, and the failed
/// items are returned with their position in the chunk. Returns the item count too.
fn decode_results<R: DeserializeOwned>(
    bytes: &[u8],
    values: &mut Vec<R>,
) -> Result<(u64, Failures)> {
    let (n, mut dec, at, failures) = split_results(bytes)?;
    let ok = n - failures.len() as u64;
    values.reserve(ok as usize);
    for _ in 0..ok {
        values.push(dec.next()?);
    }
    if dec.position() != at {
        return Err(Error::Serialization(
            "type mismatch: results left bytes over".into(),
        ));
    }
    Ok((n, failures))
}

/// Failed items of a chunk, by position in it.
type Failures = Vec<(u64, Error)>;

/// Reads the framing of a chunk's results: the item count, a decoder positioned at the
/// first value, where the values end (the failures start), and the failures (by position
/// in the chunk, in order). The values are left undecoded.
fn split_results(bytes: &[u8]) -> Result<(u64, SeqDecoder<'_>, usize, Failures)> {
    let bad = || Error::protocol("malformed results from a pool worker");
    let tail = bytes.len().checked_sub(8).ok_or_else(bad)?;
    let at = u64::from_le_bytes(bytes[tail..].try_into().map_err(|_| bad())?);
    let at = usize::try_from(at)
        .ok()
        .filter(|&a| a <= tail)
        .ok_or_else(bad)?;
    let mut failures: Vec<(u64, TaskFailure)> = crate::reduction::decode_exact(&bytes[at..tail])?;
    let mut values = SeqDecoder::new(&bytes[..at]);
    let n: u64 = values.next()?;
    if failures.len() as u64 > n || failures.iter().any(|&(k, _)| k >= n) {
        return Err(bad());
    }
    failures.sort_by_key(|&(k, _)| k);
    let failures = failures
        .into_iter()
        .map(|(k, f)| (k, Error::from(f)))
        .collect();
    Ok((n, values, at, failures))
}

/// How many items a chunk's results (as [`super::task::ResultsWriter`] lays them out)
/// are for, read without decoding them.
pub(crate) fn result_count(bytes: &[u8]) -> Result<u64> {
    SeqDecoder::new(bytes).next()
}

/// Decodes a chunk's results one by one, handing each item's to `put` with its position in
/// the chunk. Returns how many there were.
fn for_each_result<R: DeserializeOwned>(
    bytes: &[u8],
    mut put: impl FnMut(u64, Result<R>),
) -> Result<u64> {
    let mut values = Vec::new();
    let (n, failures) = decode_results::<R>(bytes, &mut values)?;
    let mut values = values.into_iter();
    let mut failures = failures.into_iter().peekable();
    for k in 0..n {
        match failures.next_if(|(i, _)| *i == k) {
            Some((_, e)) => put(k, Err(e)),
            None => put(
                k,
                Ok(values
                    .next()
                    .ok_or_else(|| Error::protocol("missing result"))?),
            ),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------- one value

/// A call's outcome: ready, or still to be decoded by whoever takes it.
enum Settled<T> {
    Ready(Result<T>),
    /// Decoding done by the thread that takes the result rather than by the pool's
    /// dispatcher thread, which is the bottleneck of a map of tiny tasks.
    Deferred(Box<dyn FnOnce() -> Result<T> + Send>),
}

impl<T> Settled<T> {
    fn into_result(self) -> Result<T> {
        match self {
            Settled::Ready(r) => r,
            Settled::Deferred(f) => f(),
        }
    }
}

struct CellState<T> {
    value: Option<Settled<T>>,
    done: bool,
    waker: Option<Waker>,
    /// [`as_completed`] sets that wait for this result, with its index there.
    listeners: Vec<(Arc<Completions>, usize)>,
}

pub(crate) struct Cell<T> {
    state: Mutex<CellState<T>>,
    cond: Condvar,
    /// `done`, readable without the lock (for the brief spin in `wait`).
    ready: std::sync::atomic::AtomicBool,
}

/// How long a waiter spins before it sleeps. A round trip through the pool is tens of
/// microseconds, about what putting a thread to sleep and waking it again costs on a
/// virtual machine; spinning that long saves the wake-up when the result is that close.
const SPIN: Duration = Duration::from_micros(50);

impl<T> Cell<T> {
    pub(crate) fn new() -> Arc<Cell<T>> {
        Arc::new(Cell {
            state: Mutex::new(CellState {
                value: None,
                done: false,
                waker: None,
                listeners: Vec::new(),
            }),
            cond: Condvar::new(),
            ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Spins for at most [`SPIN`] while the result is not ready; returns whether it is.
    fn spin(&self) -> bool {
        let start = Instant::now();
        loop {
            if self.ready.load(Ordering::Acquire) {
                return true;
            }
            if start.elapsed() >= SPIN {
                return false;
            }
            // Yield rather than spin: on a machine with few cores the worker or the
            // dispatcher may be waiting for this very core.
            std::thread::yield_now();
        }
    }

    fn set(&self, v: Result<T>) {
        self.settle(Settled::Ready(v));
    }

    fn settle(&self, v: Settled<T>) {
        let mut s = lock(&self.state);
        if s.done {
            return;
        }
        s.value = Some(v);
        s.done = true;
        self.ready.store(true, Ordering::Release);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        for (c, i) in s.listeners.drain(..) {
            c.push(i);
        }
        self.cond.notify_all();
    }
}

/// Turns the collected values (every item's, in item order) into the call's result.
pub(crate) type Finish<R, T> = fn(Vec<R>) -> Result<T>;

/// Collects the results of a job of known size into one value.
///
/// The dispatcher thread only checks each chunk's results and keeps their bytes; they are
/// decoded, in item order, by the thread that takes the result (see [`Settled`]). A failed
/// item (from a chunk, or [`fail`](Sink::fail)) fails the call with the first one in
/// item order.
pub(crate) struct CollectSink<R, T> {
    n: u64,
    frames: Vec<(u64, Vec<u8>)>,
    errors: BTreeMap<u64, Error>,
    finish: Finish<R, T>,
    cell: Arc<Cell<T>>,
}

impl<R, T> CollectSink<R, T> {
    pub(crate) fn new(n: usize, finish: Finish<R, T>, cell: Arc<Cell<T>>) -> Self {
        CollectSink {
            n: n as u64,
            frames: Vec::new(),
            errors: BTreeMap::new(),
            finish,
            cell,
        }
    }
}

/// Decodes the kept chunks of a job of `n` items, in item order.
fn assemble<R: DeserializeOwned, T>(
    n: u64,
    mut frames: Vec<(u64, Vec<u8>)>,
    mut errors: BTreeMap<u64, Error>,
    finish: Finish<R, T>,
) -> Result<T> {
    frames.sort_by_key(|(start, _)| *start);
    let mut values: Vec<R> = Vec::with_capacity(n as usize);
    let mut scratch: Vec<R> = Vec::new();
    for (start, bytes) in &frames {
        // Once an item has failed, values no longer matter: only failures are collected.
        let in_place = errors.is_empty() && *start == values.len() as u64;
        let into = if in_place { &mut values } else { &mut scratch };
        let (_, failures) = decode_results::<R>(bytes, into)?;
        scratch.clear();
        for (k, e) in failures {
            errors.entry(start + k).or_insert(e);
        }
    }
    if let Some((_, e)) = errors.pop_first() {
        return Err(e);
    }
    let got = values.len() as u64;
    if got > n {
        return Err(Error::protocol(format!("{got} results for {n} tasks")));
    }
    if got < n {
        return Err(Error::process(format!(
            "{} of {n} tasks produced no result",
            n - got
        )));
    }
    finish(values)
}

impl<R: DeserializeOwned + Send + 'static, T: Send + 'static> Sink for CollectSink<R, T> {
    fn deliver(&mut self, start: u64, results: &[u8]) -> Result<u64> {
        let (n, _, _, failures) = split_results(results)?;
        if self.errors.is_empty() && failures.is_empty() {
            self.frames
                .push((start, crate::reduction::copy_of(results)));
        } else {
            // The call fails: its values no longer matter, but every failure does (the
            // first in item order is the call's error, whatever order chunks came in).
            for (k, e) in failures {
                self.errors.entry(start + k).or_insert(e);
            }
        }
        Ok(n)
    }

    fn fail(&mut self, index: u64, error: Error) {
        self.errors.entry(index).or_insert(error);
    }

    fn finish(&mut self) {
        let (n, finish) = (self.n, self.finish);
        let frames = std::mem::take(&mut self.frames);
        let errors = std::mem::take(&mut self.errors);
        self.cell.settle(Settled::Deferred(Box::new(move || {
            assemble::<R, T>(n, frames, errors, finish)
        })));
    }

    fn abort(&mut self, error: Error) {
        self.cell.set(Err(error));
    }
}

/// A job dropped unfinished (its pool went away) must not leave its caller waiting.
impl<R, T> Drop for CollectSink<R, T> {
    fn drop(&mut self) {
        self.cell.set(Err(Error::Cancelled));
    }
}

impl<R> Drop for StreamSink<R> {
    fn drop(&mut self) {
        let mut s = lock(&self.stream.state);
        if !s.ended {
            s.failure = Some(Error::Cancelled);
            s.ended = true;
        }
        s.wake();
        self.stream.cond.notify_all();
    }
}

/// `map`: every value in order.
pub(crate) fn finish_vec<R>(values: Vec<R>) -> Result<Vec<R>> {
    Ok(values)
}

/// `apply`: the one value.
pub(crate) fn finish_one<R>(mut values: Vec<R>) -> Result<R> {
    values
        .pop()
        .ok_or_else(|| Error::process("the task produced no result"))
}

/// The result of an asynchronous pool call (`apply_async`, `map_async`, …), Python's
/// `AsyncResult`. Wait for it with [`get`](Self::get), or `.await` it: it is a `Future`.
///
/// Dropping it before the result is ready follows async Rust's convention as far as it
/// can cheaply: the call's tasks that have not started are removed from the queue; those
/// running finish (their results are discarded), unless the task was scheduled with
/// [`cancel_on_drop`](super::Schedule::cancel_on_drop), which stops them as
/// [`cancel`](Self::cancel) does. So a `tokio::time::timeout` around an awaited result
/// that gives up leaves no queued work behind.
#[must_use = "the result of a pool call is in here; dropping it drops the tasks not started"]
pub struct AsyncResult<T> {
    cell: Arc<Cell<T>>,
    cancel: Option<Box<dyn Fn() + Send + Sync>>,
    forget: Option<Box<dyn Fn() + Send + Sync>>,
    cancel_on_drop: bool,
    taken: bool,
}

impl<T> AsyncResult<T> {
    pub(crate) fn new(cell: Arc<Cell<T>>, cancel: Box<dyn Fn() + Send + Sync>) -> Self {
        AsyncResult {
            cell,
            cancel: Some(cancel),
            forget: None,
            cancel_on_drop: false,
            taken: false,
        }
    }

    /// What dropping it unfinished does: `forget` drops its tasks not started.
    pub(crate) fn forgetting(mut self, forget: Box<dyn Fn() + Send + Sync>) -> Self {
        self.forget = Some(forget);
        self
    }

    /// Dropping it unfinished cancels it.
    pub(crate) fn cancelling_on_drop(mut self, on: bool) -> Self {
        self.cancel_on_drop = on;
        self
    }

    /// Waits for the result and returns it.
    ///
    /// # Errors
    /// The task's own failure ([`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], …), or [`Error::Cancelled`] if the pool was terminated.
    pub fn get(mut self) -> Result<T> {
        self.wait();
        self.take()
    }

    /// Waits up to `timeout` for the result: [`Error::Timeout`] if it is not ready then
    /// (the `AsyncResult` stays usable); the result otherwise, which can be taken once.
    ///
    /// # Errors
    /// [`Error::Timeout`] if no result came in time; otherwise as [`get`](Self::get).
    pub fn get_timeout(&mut self, timeout: Duration) -> Result<T> {
        if !self.wait_timeout(timeout) {
            return Err(Error::timeout());
        }
        self.take()
    }

    fn take(&mut self) -> Result<T> {
        if self.taken {
            return Err(Error::process("the result was already taken"));
        }
        self.taken = true;
        let settled = lock(&self.cell.state).value.take();
        match settled {
            Some(v) => v.into_result(),
            None => Err(Error::process("the result was already taken")),
        }
    }

    /// Waits until the result is ready.
    pub fn wait(&self) {
        if self.cell.spin() {
            return;
        }
        let mut s = lock(&self.cell.state);
        while !s.done {
            s = self.cell.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits up to `timeout`; returns whether the result is ready.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        if timeout >= SPIN && self.cell.spin() {
            return true;
        }
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.cell.state);
        while !s.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .cell
                .cond
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Whether the result is ready.
    pub fn ready(&self) -> bool {
        lock(&self.cell.state).done
    }

    /// Whether the call succeeded: `None` while it runs (Python raises `ValueError`).
    pub fn successful(&self) -> Option<bool> {
        let mut s = lock(&self.cell.state);
        if !s.done {
            return None;
        }
        if let Some(Settled::Deferred(_)) = &s.value {
            let v = s.value.take().map(|v| Settled::Ready(v.into_result()));
            s.value = v;
        }
        Some(matches!(s.value, Some(Settled::Ready(Ok(_)))) || (self.taken && s.value.is_none()))
    }

    /// Stops the work: items not started are dropped, and the workers running its items
    /// are killed (and replaced). The result becomes [`Error::Cancelled`].
    pub fn cancel(&self) {
        if let Some(c) = &self.cancel {
            c();
        }
    }
}

impl<T> Future for AsyncResult<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        // AsyncResult is Unpin (all its fields are).
        let this = self.get_mut();
        {
            let mut s = lock(&this.cell.state);
            if !s.done {
                s.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        Poll::Ready(this.take())
    }
}

impl<T> Drop for AsyncResult<T> {
    fn drop(&mut self) {
        if self.taken || self.cell.ready.load(Ordering::Acquire) {
            return;
        }
        if self.cancel_on_drop {
            self.cancel();
        } else if let Some(f) = &self.forget {
            f();
        }
    }
}

impl<T> std::fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult")
            .field("ready", &self.ready())
            .finish()
    }
}

// ---------------------------------------------------------------- streams

struct StreamState<R> {
    ordered: bool,
    next: u64,
    /// Ordered: the results of items `next..`, by offset from `next`, for those that
    /// arrived (`None`: not yet). Items further ahead than [`NEAR`] wait in `far`.
    pending: VecDeque<Option<Result<R>>>,
    far: BTreeMap<u64, Result<R>>,
    arrived: VecDeque<Result<R>>,
    ended: bool,
    failure: Option<Error>,
    /// The task awaiting the stream ([`IMap`] as a `Stream`).
    waker: Option<Waker>,
}

impl<R> StreamState<R> {
    /// Wakes the task awaiting the stream, if any (after a change under the lock).
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// What the consumer gets now; `None`: nothing yet, wait.
    fn next_ready(&mut self) -> Option<Next<R>> {
        let item = if self.ordered {
            let item = match self.pending.front_mut() {
                Some(slot @ Some(_)) => slot.take(),
                _ => self.far.remove(&self.next),
            };
            if item.is_some() {
                self.pending.pop_front();
                self.next += 1;
            }
            item
        } else {
            self.arrived.pop_front()
        };
        if let Some(v) = item {
            return Some(Next::Item(v));
        }
        if let Some(e) = self.failure.take() {
            return Some(Next::Done(Some(Err(e))));
        }
        if self.ended {
            return Some(Next::Done(None));
        }
        None
    }
}

/// How far ahead of the next item to hand over a result may be kept by offset; beyond
/// that (only if results arrive far out of order) it is kept by index.
const NEAR: u64 = 1 << 16;

impl<R> StreamState<R> {
    /// Keeps the result of item `i` until the consumer reaches it.
    fn put(&mut self, i: u64, v: Result<R>) {
        let Some(off) = i.checked_sub(self.next) else {
            return; // handed over already: a duplicate
        };
        if off >= NEAR {
            self.far.insert(i, v);
            return;
        }
        let off = off as usize;
        if self.pending.len() <= off {
            self.pending.resize_with(off + 1, || None);
        }
        self.pending[off] = Some(v);
    }
}

/// See [`StreamState::next_ready`].
enum Next<R> {
    /// An item's result: counted as consumed.
    Item(Result<R>),
    /// The end, or the error that ended the call early.
    Done(Option<Result<R>>),
}

pub(crate) struct Stream<R> {
    state: Mutex<StreamState<R>>,
    cond: Condvar,
    /// Items the consumer has taken: the dispatcher keeps `pulled - consumed` bounded.
    pub(crate) consumed: Arc<AtomicU64>,
}

impl<R> Stream<R> {
    pub(crate) fn new(ordered: bool) -> Arc<Stream<R>> {
        Arc::new(Stream {
            state: Mutex::new(StreamState {
                ordered,
                next: 0,
                pending: VecDeque::new(),
                far: BTreeMap::new(),
                arrived: VecDeque::new(),
                ended: false,
                failure: None,
                waker: None,
            }),
            cond: Condvar::new(),
            consumed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Adds results under one lock, with one wake-up (a chunk's worth at a time).
    fn push_all(&self, items: impl IntoIterator<Item = (u64, Result<R>)>) {
        let mut s = lock(&self.state);
        for (i, v) in items {
            if s.ordered {
                s.put(i, v);
            } else {
                s.arrived.push_back(v);
            }
        }
        s.wake();
        drop(s);
        self.cond.notify_all();
    }
}

pub(crate) struct StreamSink<R> {
    pub(crate) stream: Arc<Stream<R>>,
    /// Results delivered since the last [`flush`](Sink::flush).
    pub(crate) batch: Vec<(u64, Result<R>)>,
}

impl<R: DeserializeOwned + Send> Sink for StreamSink<R> {
    fn deliver(&mut self, start: u64, results: &[u8]) -> Result<u64> {
        let batch = &mut self.batch;
        for_each_result::<R>(results, |k, r| batch.push((start + k, r)))
    }

    fn fail(&mut self, index: u64, error: Error) {
        self.batch.push((index, Err(error)));
    }

    fn finish(&mut self) {
        self.flush();
        let mut s = lock(&self.stream.state);
        s.ended = true;
        s.wake();
        self.stream.cond.notify_all();
    }

    fn abort(&mut self, error: Error) {
        self.batch.clear();
        let mut s = lock(&self.stream.state);
        s.failure = Some(error);
        s.ended = true;
        s.wake();
        self.stream.cond.notify_all();
    }

    fn flush(&mut self) {
        if !self.batch.is_empty() {
            self.stream.push_all(self.batch.drain(..));
        }
    }
}

/// The lazy iterator of [`Pool::imap`](super::Pool::imap) (results in input order) and
/// [`Pool::imap_unordered`](super::Pool::imap_unordered) (results as they come). Each item
/// is the `Result` of one task, so a failed task does not end the iteration.
pub struct IMap<R> {
    stream: Arc<Stream<R>>,
    wake: Box<dyn Fn() + Send + Sync>,
    cancel: Box<dyn Fn() + Send + Sync>,
}

impl<R> IMap<R> {
    pub(crate) fn new(
        stream: Arc<Stream<R>>,
        wake: Box<dyn Fn() + Send + Sync>,
        cancel: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        IMap {
            stream,
            wake,
            cancel,
        }
    }

    /// The next result, waiting at most `timeout` (Python's `next(timeout)`):
    /// `Some(Err(Error::Timeout { .. }))` if none arrived in time.
    ///
    /// # Errors
    /// [`Error::Timeout`] if no result came in time.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<R>> {
        self.next_inner(Some(Instant::now() + timeout))
    }

    /// Stops the remaining work (see [`AsyncResult::cancel`]).
    pub fn cancel(&self) {
        (self.cancel)()
    }

    /// Counts an item taken, and lets the dispatcher pull more input.
    fn took(&self) {
        self.stream.consumed.fetch_add(1, Ordering::SeqCst);
        (self.wake)();
    }

    fn next_inner(&mut self, deadline: Option<Instant>) -> Option<Result<R>> {
        let mut s = lock(&self.stream.state);
        loop {
            match s.next_ready() {
                Some(Next::Item(v)) => {
                    drop(s);
                    self.took();
                    return Some(v);
                }
                Some(Next::Done(v)) => return v,
                None => {}
            }
            s = match deadline {
                None => self.stream.cond.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Some(Err(Error::timeout()));
                    }
                    self.stream
                        .cond
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

impl<R> Iterator for IMap<R> {
    type Item = Result<R>;
    fn next(&mut self) -> Option<Result<R>> {
        self.next_inner(None)
    }
}

/// `IMap` is also a `Stream` of the same results: awaiting the next one never blocks the
/// thread that polls it. As it is an `Iterator` too, name the trait where both are in
/// scope (`StreamExt::next(&mut imap)`).
///
/// ```
/// use futures::StreamExt;
/// use multiprocess::Pool;
/// fn cube(x: u64) -> u64 { x * x * x }
/// let pool = Pool::new(2)?;
/// let mut cubes = pool.imap(cube, 1..=3)?;
/// let got = futures::executor::block_on(async {
///     let mut got = Vec::new();
///     while let Some(r) = StreamExt::next(&mut cubes).await {
///         got.push(r?);
///     }
///     Ok::<_, multiprocess::Error>(got)
/// })?;
/// assert_eq!(got, [1, 8, 27]);
/// # Ok::<(), multiprocess::Error>(())
/// ```
impl<R> futures_core::Stream for IMap<R> {
    type Item = Result<R>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<R>>> {
        let this = self.get_mut();
        let mut s = lock(&this.stream.state);
        match s.next_ready() {
            Some(Next::Item(v)) => {
                drop(s);
                this.took();
                Poll::Ready(Some(v))
            }
            Some(Next::Done(v)) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<R> Drop for IMap<R> {
    fn drop(&mut self) {
        // Nobody will read the rest: stop producing it.
        let ended = lock(&self.stream.state).ended;
        if !ended {
            (self.cancel)();
        }
    }
}

impl<R> std::fmt::Debug for IMap<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IMap").finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------- as_completed

/// Indices of the results of an [`AsCompleted`] that are ready, in the order they became so.
pub(crate) struct Completions {
    state: Mutex<CompletionsState>,
    cond: Condvar,
}

struct CompletionsState {
    ready: VecDeque<usize>,
    waker: Option<Waker>,
}

impl Completions {
    fn push(&self, i: usize) {
        let mut s = lock(&self.state);
        s.ready.push_back(i);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        drop(s);
        self.cond.notify_all();
    }
}

/// Results as they complete: see [`as_completed`].
#[must_use = "iterate over it, or await it as a Stream"]
pub struct AsCompleted<R> {
    results: Vec<Option<AsyncResult<R>>>,
    completions: Arc<Completions>,
    left: usize,
}

/// Yields each result of `results` as soon as it is ready, with its index in `results`:
/// `(index, Result<R>)` in completion order (Python's `concurrent.futures.as_completed`).
/// It is an [`Iterator`] (each `next` waits) and a `Stream` (awaiting never blocks the
/// polling thread). Dropping it drops the results not yielded yet (see
/// [`AsyncResult`]).
///
/// ```
/// use multiprocess::{pool::as_completed, Pool};
/// use std::time::Duration;
///
/// fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
///
/// let pool = Pool::new(3)?;
/// let calls = [800, 10, 400].map(|ms| pool.apply_async(nap, ms).unwrap());
/// let order: Vec<usize> = as_completed(calls).map(|(i, r)| { r.unwrap(); i }).collect();
/// assert_eq!(order, [1, 2, 0]);
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub fn as_completed<R, I>(results: I) -> AsCompleted<R>
where
    I: IntoIterator<Item = AsyncResult<R>>,
{
    let completions = Arc::new(Completions {
        state: Mutex::new(CompletionsState {
            ready: VecDeque::new(),
            waker: None,
        }),
        cond: Condvar::new(),
    });
    let results: Vec<Option<AsyncResult<R>>> = results.into_iter().map(Some).collect();
    for (i, r) in results.iter().enumerate() {
        let r = r.as_ref().expect("just placed");
        let mut s = lock(&r.cell.state);
        if s.done || r.taken {
            completions.push(i);
        } else {
            s.listeners.push((completions.clone(), i));
        }
    }
    AsCompleted {
        left: results.len(),
        results,
        completions,
    }
}

impl<R> AsCompleted<R> {
    fn take(&mut self, i: usize) -> (usize, Result<R>) {
        self.left -= 1;
        let r = match self.results.get_mut(i).and_then(Option::take) {
            Some(mut r) => r.take(),
            None => Err(Error::process("the result was already taken")),
        };
        (i, r)
    }
}

impl<R> Iterator for AsCompleted<R> {
    type Item = (usize, Result<R>);

    fn next(&mut self) -> Option<(usize, Result<R>)> {
        if self.left == 0 {
            return None;
        }
        let mut s = lock(&self.completions.state);
        let i = loop {
            if let Some(i) = s.ready.pop_front() {
                break i;
            }
            s = self
                .completions
                .cond
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        };
        drop(s);
        Some(self.take(i))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<R> futures_core::Stream for AsCompleted<R> {
    type Item = (usize, Result<R>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let mut s = lock(&this.completions.state);
        match s.ready.pop_front() {
            Some(i) => {
                drop(s);
                Poll::Ready(Some(this.take(i)))
            }
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<R> std::fmt::Debug for AsCompleted<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsCompleted")
            .field("left", &self.left)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordered_stream_hands_over_in_item_order_however_results_arrive() {
        let stream = Stream::<u64>::new(true);
        let far = NEAR + 5;
        // Out of order, one far ahead, one duplicate of an item handed over already.
        let order = [3, 1, far, 0, 2, 0];
        let mut got = Vec::new();
        for i in order {
            stream.push_all([(i, Ok(i))]);
            let mut s = lock(&stream.state);
            while let Some(Next::Item(v)) = s.next_ready() {
                got.push(v.unwrap());
            }
        }
        assert_eq!(got, vec![0, 1, 2, 3]);
        stream.push_all((4..far).map(|i| (i, Ok(i))));
        let mut s = lock(&stream.state);
        let mut n = 4;
        while let Some(Next::Item(v)) = s.next_ready() {
            assert_eq!(v.unwrap(), n);
            n += 1;
        }
        assert_eq!(n, far + 1, "the far item comes in its turn");
        assert!(s.pending.is_empty() && s.far.is_empty());
    }

    /// A worker's encoding of the results of one chunk.
    fn results(values: &[std::result::Result<i64, TaskFailure>]) -> Vec<u8> {
        let mut w = crate::pool::task::ResultsWriter::new(Vec::new(), values.len()).unwrap();
        for v in values {
            match v {
                Ok(v) => w.push_ok(v).unwrap(),
                Err(TaskFailure::Panicked { message, location }) => {
                    w.push_failure(TaskFailure::Panicked {
                        message: message.clone(),
                        location: location.clone(),
                    })
                }
                Err(TaskFailure::Decode(e)) => w.push_failure(TaskFailure::Decode(e.clone())),
            }
        }
        w.finish().unwrap()
    }

    fn collect(
        chunks: &[(u64, Vec<std::result::Result<i64, TaskFailure>>)],
        n: usize,
    ) -> Result<Vec<i64>> {
        let cell = Cell::new();
        let mut sink = CollectSink::new(n, finish_vec, cell.clone());
        for (start, values) in chunks {
            assert_eq!(
                sink.deliver(*start, &results(values)).unwrap(),
                values.len() as u64
            );
        }
        sink.finish();
        AsyncResult::new(cell, Box::new(|| {})).get()
    }

    #[test]
    fn chunks_out_of_order_are_put_in_item_order() {
        let v = collect(
            &[
                (4, vec![Ok(4), Ok(5)]),
                (2, vec![Ok(2), Ok(3)]),
                (0, vec![Ok(0), Ok(1)]),
            ],
            6,
        );
        assert_eq!(v.unwrap(), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn the_first_failed_item_is_the_error() {
        let panic = |m: &str| {
            Err(TaskFailure::Panicked {
                message: m.into(),
                location: String::new(),
            })
        };
        let r = collect(
            &[
                (2, vec![Ok(2), panic("late")]),
                (0, vec![panic("early"), Ok(1)]),
            ],
            4,
        );
        match r {
            Err(Error::Panicked { message, .. }) => assert_eq!(message, "early"),
            other => panic!("expected the first failure, got {other:?}"),
        }
    }

    #[test]
    fn an_earlier_failure_in_a_later_chunk_still_wins() {
        // A worker death reported for item 7 first, then a chunk whose item 3 panicked:
        // the call's error is item 3's.
        let cell = Cell::<Vec<i64>>::new();
        let mut sink = CollectSink::<i64, Vec<i64>>::new(8, finish_vec, cell.clone());
        sink.fail(7, Error::timeout());
        let panic = Err(TaskFailure::Panicked {
            message: "three".into(),
            location: String::new(),
        });
        sink.deliver(2, &results(&[Ok(2), panic, Ok(4)])).unwrap();
        sink.finish();
        match AsyncResult::new(cell, Box::new(|| {})).get() {
            Err(Error::Panicked { message, .. }) => assert_eq!(message, "three"),
            other => panic!("expected item 3's panic, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_chunk_is_an_error_not_a_short_vec() {
        let r = collect(&[(0, vec![Ok(0), Ok(1)])], 4);
        assert!(matches!(r, Err(Error::Process(_))), "{r:?}");
    }

    #[test]
    fn malformed_results_are_an_error_not_a_panic() {
        let good = results(&[Ok(1), Ok(2)]);
        let mut bogus_offset = good.clone();
        let n = bogus_offset.len();
        bogus_offset[n - 8..].copy_from_slice(&u64::MAX.to_le_bytes());
        for bytes in [
            &[][..],
            &[1, 2, 3][..],
            &good[..good.len() - 1],
            &bogus_offset[..],
        ] {
            let cell = Cell::<Vec<i64>>::new();
            let mut sink = CollectSink::<i64, Vec<i64>>::new(2, finish_vec, cell);
            assert!(sink.deliver(0, bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn results_of_the_wrong_type_are_an_error() {
        // Decoded by the caller, when it takes the result.
        let cell = Cell::<Vec<u8>>::new();
        let mut sink = CollectSink::<u8, Vec<u8>>::new(2, finish_vec, cell.clone());
        assert_eq!(sink.deliver(0, &results(&[Ok(1), Ok(2)])).unwrap(), 2);
        sink.finish();
        let r = AsyncResult::new(cell, Box::new(|| {})).get();
        assert!(matches!(r, Err(Error::Serialization(_))), "{r:?}");
    }

    #[test]
    fn successful_decodes_a_deferred_result() {
        let cell = Cell::<Vec<i64>>::new();
        let mut sink = CollectSink::<i64, Vec<i64>>::new(2, finish_vec, cell.clone());
        sink.deliver(0, &results(&[Ok(1), Ok(2)])).unwrap();
        sink.finish();
        let r = AsyncResult::new(cell, Box::new(|| {}));
        assert_eq!(r.successful(), Some(true));
        assert_eq!(r.get().unwrap(), vec![1, 2]);
    }
}
