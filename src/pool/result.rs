//! Where results land: `AsyncResult` for one value (or one `Vec`), the lazy iterators of
//! `imap`/`imap_unordered`, and the sinks through which the dispatcher fills them.

use super::task::TaskFailure;
use crate::error::{Error, Result};
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
    /// Results of items `start..start+n` (an encoded `Vec<Result<R, TaskFailure>>`).
    /// Returns how many items that was.
    fn deliver(&mut self, start: u64, results: &[u8]) -> Result<u64>;
    /// Item `index` failed.
    fn fail(&mut self, index: u64, error: Error);
    /// Every item has been delivered or failed.
    fn finish(&mut self);
    /// The job ends early (cancelled, pool terminated): everything missing fails.
    fn abort(&mut self, error: Error);
}

/// Decodes a chunk's results (a sequence: the count, then each `Result<R, TaskFailure>`) one by one,
/// handing each to `put` with its position in the chunk. Returns how many there were.
fn for_each_result<R: DeserializeOwned>(
    bytes: &[u8],
    mut put: impl FnMut(u64, Result<R>),
) -> Result<u64> {
    let (n, mut at) = crate::reduction::decode_from::<u64>(bytes)?;
    for k in 0..n {
        let rest = bytes
            .get(at..)
            .ok_or_else(|| Error::protocol("truncated results"))?;
        let (r, used) = crate::reduction::decode_from::<std::result::Result<R, TaskFailure>>(rest)?;
        at += used;
        put(k, r.map_err(Error::from));
    }
    Ok(n)
}

// ---------------------------------------------------------------- one value

struct CellState<T> {
    value: Option<Result<T>>,
    done: bool,
    waker: Option<Waker>,
}

pub(crate) struct Cell<T> {
    state: Mutex<CellState<T>>,
    cond: Condvar,
}

impl<T> Cell<T> {
    pub(crate) fn new() -> Arc<Cell<T>> {
        Arc::new(Cell {
            state: Mutex::new(CellState {
                value: None,
                done: false,
                waker: None,
            }),
            cond: Condvar::new(),
        })
    }

    fn set(&self, v: Result<T>) {
        let mut s = lock(&self.state);
        if s.done {
            return;
        }
        s.value = Some(v);
        s.done = true;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        self.cond.notify_all();
    }
}

/// Turns the collected values (and the failures, by item index) into the call's result.
pub(crate) type Finish<R, T> = fn(Vec<Option<R>>, BTreeMap<u64, Error>) -> Result<T>;

/// Collects the results of a job of known size into one value.
pub(crate) struct CollectSink<R, T> {
    values: Vec<Option<R>>,
    errors: BTreeMap<u64, Error>,
    missing: u64,
    finish: Finish<R, T>,
    cell: Arc<Cell<T>>,
}

impl<R, T> CollectSink<R, T> {
    pub(crate) fn new(n: usize, finish: Finish<R, T>, cell: Arc<Cell<T>>) -> Self {
        let mut values = Vec::with_capacity(n);
        values.resize_with(n, || None);
        CollectSink {
            values,
            errors: BTreeMap::new(),
            missing: n as u64,
            finish,
            cell,
        }
    }

    fn put(&mut self, i: u64, v: Result<R>) {
        let Some(slot) = self.values.get_mut(i as usize) else {
            return;
        };
        // The error map is empty on the fast path: keep it off the per-item cost.
        let had_error = !self.errors.is_empty() && self.errors.contains_key(&i);
        if slot.is_none() && !had_error {
            self.missing -= 1;
        }
        match v {
            Ok(v) => {
                *slot = Some(v);
                if had_error {
                    self.errors.remove(&i);
                }
            }
            Err(e) => {
                *slot = None;
                self.errors.insert(i, e);
            }
        }
    }
}

impl<R: DeserializeOwned + Send, T: Send> Sink for CollectSink<R, T> {
    fn deliver(&mut self, start: u64, results: &[u8]) -> Result<u64> {
        for_each_result::<R>(results, |k, r| self.put(start + k, r))
    }

    fn fail(&mut self, index: u64, error: Error) {
        self.put(index, Err(error));
    }

    fn finish(&mut self) {
        let values = std::mem::take(&mut self.values);
        let errors = std::mem::take(&mut self.errors);
        self.cell.set((self.finish)(values, errors));
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
        self.stream.cond.notify_all();
    }
}

/// `map`: every value in order, or the first error in item order.
pub(crate) fn finish_vec<R>(
    values: Vec<Option<R>>,
    mut errors: BTreeMap<u64, Error>,
) -> Result<Vec<R>> {
    if let Some((_, e)) = errors.pop_first() {
        return Err(e);
    }
    values
        .into_iter()
        .map(|v| v.ok_or_else(|| Error::process("a task produced no result")))
        .collect()
}

/// `apply`: the one value.
pub(crate) fn finish_one<R>(values: Vec<Option<R>>, errors: BTreeMap<u64, Error>) -> Result<R> {
    finish_vec(values, errors)?
        .pop()
        .ok_or_else(|| Error::process("the task produced no result"))
}

/// The result of an asynchronous pool call (`apply_async`, `map_async`, …), Python's
/// `AsyncResult`. Wait for it with [`get`](Self::get), or `.await` it: it is a `Future`.
///
/// Dropping it never leaks a worker; the work still runs (use [`cancel`](Self::cancel) to
/// stop it).
#[must_use = "the result of a pool call is in here"]
pub struct AsyncResult<T> {
    cell: Arc<Cell<T>>,
    cancel: Option<Box<dyn Fn() + Send + Sync>>,
    taken: bool,
}

impl<T> AsyncResult<T> {
    pub(crate) fn new(cell: Arc<Cell<T>>, cancel: Box<dyn Fn() + Send + Sync>) -> Self {
        AsyncResult {
            cell,
            cancel: Some(cancel),
            taken: false,
        }
    }

    /// Waits for the result and returns it.
    pub fn get(mut self) -> Result<T> {
        self.wait();
        self.take()
    }

    /// Waits up to `timeout` for the result: [`Error::Timeout`] if it is not ready then
    /// (the `AsyncResult` stays usable); the result otherwise, which can be taken once.
    pub fn get_timeout(&mut self, timeout: Duration) -> Result<T> {
        if !self.wait_timeout(timeout) {
            return Err(Error::Timeout);
        }
        self.take()
    }

    fn take(&mut self) -> Result<T> {
        if self.taken {
            return Err(Error::process("the result was already taken"));
        }
        self.taken = true;
        lock(&self.cell.state)
            .value
            .take()
            .unwrap_or_else(|| Err(Error::process("the result was already taken")))
    }

    /// Waits until the result is ready.
    pub fn wait(&self) {
        let mut s = lock(&self.cell.state);
        while !s.done {
            s = self.cell.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits up to `timeout`; returns whether the result is ready.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
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
        let s = lock(&self.cell.state);
        if !s.done {
            return None;
        }
        Some(matches!(s.value, Some(Ok(_))) || (self.taken && s.value.is_none()))
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
    pending: BTreeMap<u64, Result<R>>,
    arrived: VecDeque<Result<R>>,
    ended: bool,
    failure: Option<Error>,
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
                pending: BTreeMap::new(),
                arrived: VecDeque::new(),
                ended: false,
                failure: None,
            }),
            cond: Condvar::new(),
            consumed: Arc::new(AtomicU64::new(0)),
        })
    }

    fn push(&self, i: u64, v: Result<R>) {
        let mut s = lock(&self.state);
        if s.ordered {
            s.pending.insert(i, v);
        } else {
            s.arrived.push_back(v);
        }
        self.cond.notify_all();
    }
}

pub(crate) struct StreamSink<R> {
    pub(crate) stream: Arc<Stream<R>>,
}

impl<R: DeserializeOwned + Send> Sink for StreamSink<R> {
    fn deliver(&mut self, start: u64, results: &[u8]) -> Result<u64> {
        let stream = &self.stream;
        for_each_result::<R>(results, |k, r| stream.push(start + k, r))
    }

    fn fail(&mut self, index: u64, error: Error) {
        self.stream.push(index, Err(error));
    }

    fn finish(&mut self) {
        lock(&self.stream.state).ended = true;
        self.stream.cond.notify_all();
    }

    fn abort(&mut self, error: Error) {
        let mut s = lock(&self.stream.state);
        s.failure = Some(error);
        s.ended = true;
        self.stream.cond.notify_all();
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
    /// `Some(Err(Error::Timeout))` if none arrived in time.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<R>> {
        self.next_inner(Some(Instant::now() + timeout))
    }

    /// Stops the remaining work (see [`AsyncResult::cancel`]).
    pub fn cancel(&self) {
        (self.cancel)()
    }

    fn next_inner(&mut self, deadline: Option<Instant>) -> Option<Result<R>> {
        let mut s = lock(&self.stream.state);
        loop {
            let item = if s.ordered {
                let next = s.next;
                s.pending.remove(&next).inspect(|_| s.next += 1)
            } else {
                s.arrived.pop_front()
            };
            if let Some(v) = item {
                drop(s);
                self.stream.consumed.fetch_add(1, Ordering::SeqCst);
                (self.wake)();
                return Some(v);
            }
            if let Some(e) = s.failure.take() {
                return Some(Err(e));
            }
            if s.ended {
                return None;
            }
            s = match deadline {
                None => self.stream.cond.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Some(Err(Error::Timeout));
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
