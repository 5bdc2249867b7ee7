//! The async forms of `get` and `put`: they wait in the crate's reactor on the same
//! shared-memory words as the blocking forms, so the thread that polls them never blocks
//! while the queue is empty (or full), and a producer in another process wakes them as it
//! wakes a blocked `get`.
//!
//! Dropping a future loses nothing: an item is taken only inside the poll that returns it,
//! and an item given to `put_async` is either in the queue when it returns or dropped with
//! the future, never half-written.

use super::{PutError, Queue, SimpleQueue};
use crate::error::{Error, Result};
use crate::sys::reactor::{FutexWatch, FutexWord};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::ring::Ring;

/// How soon a waiter looks again when the queue has data (or room) but another handle
/// holds its lock: that handle's progress is not signalled on the word we wait on.
const CONTENDED_RETRY: Duration = Duration::from_millis(2);

/// Polls in a row that found an empty queue with no room for the item: then the item is
/// larger than the buffer's free space and must be streamed by the blocking `put`.
const TOO_LARGE_AFTER: u32 = 3;

struct DataWord(Arc<Ring>);

impl FutexWord for DataWord {
    fn word(&self) -> &AtomicU32 {
        self.0.data_word()
    }
}

struct SpaceWord(Arc<Ring>);

impl FutexWord for SpaceWord {
    fn word(&self) -> &AtomicU32 {
        self.0.space_word()
    }
}

/// Counts a consumer future among the waiters (so that producers wake the data word)
/// for as long as it lives.
struct Waiting(Arc<Ring>);

impl Waiting {
    fn new(ring: &Arc<Ring>) -> Waiting {
        ring.count_data_waiter(true);
        Waiting(ring.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.count_data_waiter(false);
    }
}

impl<T: DeserializeOwned> Queue<T> {
    /// Takes the oldest item, waiting for one without blocking the thread that polls the
    /// future: [`get`](Self::get) for async code, under any runtime (tokio, smol,
    /// `futures::executor`...). Dropping the future before it is ready takes nothing from
    /// the queue.
    ///
    /// Once an item has begun to arrive in pieces (an item larger than a sixteenth of the
    /// buffer, while its producer is still writing it), the rest of it is read as `get`
    /// reads it.
    ///
    /// ```
    /// use multiprocess::Queue;
    /// let q = Queue::new()?;
    /// q.put(5)?;
    /// assert_eq!(futures::executor::block_on(q.get_async())?, 5);
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`get`](Self::get): [`Error::Closed`], [`Error::Serialization`] for an item
    /// that does not decode as `T` (it is consumed), an OS error.
    pub async fn get_async(&self) -> Result<T> {
        let mut waiting: Option<Waiting> = None;
        let mut watch = FutexWatch::new();
        poll_fn(|cx| {
            let ring = &self.ring;
            if waiting.is_none() {
                // Counted in before we look, so that an item published after the look
                // wakes the word.
                waiting = Some(Waiting::new(ring));
            }
            let seq = ring.data_word().load(Ordering::SeqCst);
            match self.try_get() {
                Err(Error::Empty) => {}
                done => return Poll::Ready(done),
            }
            let retry = ring.has_data().then(|| Instant::now() + CONTENDED_RETRY);
            watch.arm(Arc::new(DataWord(ring.clone())), seq, retry, cx.waker())?;
            Poll::Pending
        })
        .await
    }
}

impl<T: Serialize> Queue<T> {
    /// Puts an item, waiting while the queue is full without blocking the thread that
    /// polls the future: [`put`](Self::put) for async code. When it returns `Ok`, the item
    /// is in shared memory; dropping the future before then drops the item and leaves
    /// nothing of it in the queue.
    ///
    /// An item too large for the buffer's free space even when the queue is empty is
    /// streamed by `put` (which waits while consumers take its pieces).
    ///
    /// ```
    /// use multiprocess::Queue;
    /// let q = Queue::with_maxsize(1)?;
    /// futures::executor::block_on(q.put_async("hi".to_string()))?;
    /// assert_eq!(q.get()?, "hi");
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`put`](Self::put): [`Error::Closed`], [`Error::Serialization`], an OS error.
    pub async fn put_async(&self, item: T) -> Result<()> {
        let mut item = Some(item);
        let mut watch = FutexWatch::new();
        let mut stuck = 0u32;
        poll_fn(|cx| {
            let ring = &self.ring;
            let Some(it) = item.take() else {
                return Poll::Ready(Err(Error::process("put_async polled after completion")));
            };
            let it = match self.try_put(it) {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(PutError::Failed(e)) => return Poll::Ready(Err(e)),
                Err(PutError::Full(it)) => it,
            };
            // Ask the consumers to signal their next step, then look once more.
            ring.want_any_progress();
            let seq = ring.space_word().load(Ordering::SeqCst);
            let it = match self.try_put(it) {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(PutError::Failed(e)) => return Poll::Ready(Err(e)),
                Err(PutError::Full(it)) => it,
            };
            let empty = !ring.has_data() && ring.len() == 0;
            stuck = if empty { stuck + 1 } else { 0 };
            if stuck >= TOO_LARGE_AFTER {
                return Poll::Ready(self.put(it));
            }
            item = Some(it);
            // An empty queue with no room: another producer holds the lock (and will
            // publish), or the item is too large; look again soon.
            let retry = empty.then(|| Instant::now() + CONTENDED_RETRY);
            watch.arm(Arc::new(SpaceWord(ring.clone())), seq, retry, cx.waker())?;
            Poll::Pending
        })
        .await
    }
}

impl<T: DeserializeOwned> SimpleQueue<T> {
    /// [`get`](Self::get) for async code; see [`Queue::get_async`].
    ///
    /// # Errors
    /// As [`Queue::get_async`].
    pub async fn get_async(&self) -> Result<T> {
        self.queue.get_async().await
    }
}

impl<T: Serialize> SimpleQueue<T> {
    /// [`put`](Self::put) for async code; see [`Queue::put_async`].
    ///
    /// # Errors
    /// As [`Queue::put_async`].
    pub async fn put_async(&self, item: T) -> Result<()> {
        self.queue.put_async(item).await
    }
}
