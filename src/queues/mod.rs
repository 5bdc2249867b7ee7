//! Python's `multiprocessing.queues` — [`Queue`], [`SimpleQueue`] and
//! [`JoinableQueue`]: FIFO queues of any serde type between any number of producer and
//! consumer processes.
//!
//! ```
//! use multiprocess::{Process, Queue};
//!
//! fn worker(q: Queue<String>) {
//!     q.put(format!("hello from {}", std::process::id())).unwrap();
//! }
//!
//! let q = Queue::new()?;
//! let p = Process::new(worker, q.clone());
//! p.start()?;
//! assert!(q.get()?.starts_with("hello from "));
//! p.join()?;
//! # Ok::<(), multiprocess::Error>(())
//! ```
//!
//! # How they work, and where they differ from Python
//! A queue is a ring buffer in shared memory (an anonymous memfd, 4 MiB by default, see
//! [`Queue::with_buffer_size`]). A handle travels to a child in `Process` args or through a
//! [`Connection`](crate::Connection) as its descriptor and arrives usable; clone a handle to
//! share it between threads or to hand it to several children.
//!
//! * **No feeder thread, no exit deadlock.** CPython's `put` hands the item to a background
//!   thread that writes it to a pipe later, so a process that exits with items still
//!   buffered there blocks at exit ("joining processes that use queues"), and items can be
//!   lost if it is killed. Here `put` encodes the item straight into shared memory: when
//!   `put` returns, the item is in the queue, and the process may exit or be killed at any
//!   time without losing it or blocking.
//! * **When `put` blocks.** Like a bounded queue, `put` waits while the queue holds
//!   `maxsize` items ([`Queue::with_maxsize`]) **or while the shared buffer is full** (its
//!   size in bytes is fixed). So with an unbounded queue a producer can still wait for a
//!   consumer once more than the buffer's worth of data is outstanding; CPython's feeder
//!   thread would buffer it in process memory instead (and then block at exit). Get items
//!   before joining producers that put a lot.
//! * **Items of any size.** An item larger than the free space is streamed through the
//!   buffer in pieces while a consumer takes it, without any copy of the whole encoded
//!   item on either side; the consumer still sees one item. The wait of `put_timeout` and
//!   `try_put` covers the whole item: if it runs out half-way, the part already sent is
//!   discarded by the consumer and the item comes back in [`PutError::Full`].
//! * **Crash safety.** Producers and consumers take the crate's crash-safe lock (the one
//!   [`Lock`](crate::Lock) uses): if a process is killed (even `SIGKILL`) inside `put` or
//!   `get`, the next one takes the lock over (after at most
//!   [`HOLDER_CHECK_INTERVAL`](crate::synchronize::HOLDER_CHECK_INTERVAL)) and completes
//!   or undoes what it left half-done. A killed producer never leaves a half-written item
//!   that anyone reads, and an item is counted (in `qsize` and a `JoinableQueue`'s tasks)
//!   exactly when it becomes visible. A holder whose fate cannot be read (no `/proc`) is
//!   never taken for dead.
//! * **Delivery when a consumer dies.** A plain [`Queue`] (and [`SimpleQueue`]) delivers
//!   each item *at most once*: an item whose `get` has returned belongs to its taker, and
//!   is gone if the taker dies; a consumer killed *inside* `get` loses nothing if the item
//!   sat in the buffer in one piece (the next consumer gets it), and only that item if it
//!   was being streamed. A [`JoinableQueue`] delivers *at least once*: an item taken by a
//!   process that dies before `task_done` is delivered again to another consumer (see
//!   [`JoinableQueue`]).
//! * **Bad items.** An item that fails to decode as `T` (say the queue was received with
//!   another item type) is consumed and reported as [`Error::Serialization`]; the next
//!   `get` works.
//! * `qsize` counts items put and not yet taken (approximate while others use the queue,
//!   as in Python). [`close`](Queue::close) closes this handle only.
//! * Once an item has *begun* to arrive, `get_timeout` waits for the rest of it as long as
//!   its producer lives (a producer that dies or gives up is noticed within ~20 ms).
//! * Decoding refuses lengths over 64 GiB (a mistyped item is an error, not an abort).
//! * Items are plain data: they cannot carry descriptors (a `Connection` or another queue
//!   inside an item is an encoding error). Hand those over in `Process` args or through a
//!   `Connection`.
//! * For byte buffers use `serde_bytes::ByteBuf` (or `#[serde(with = "serde_bytes")]`):
//!   a plain `Vec<u8>` goes through serde one byte at a time.

mod aio;
mod ring;

use crate::error::{Error, Result};
use ring::{Put, Ring};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The default size of a queue's shared buffer: 4 MiB.
pub const DEFAULT_BUFFER_SIZE: usize = 4 << 20;

/// Why [`Queue::try_put`] or [`Queue::put_timeout`] did not put the item.
#[derive(Debug)]
pub enum PutError<T> {
    /// No room before the deadline (Python's `queue.Full`); here is the item back.
    Full(T),
    /// Any other failure: the handle is closed, the item cannot be encoded, an OS error.
    Failed(Error),
}

impl<T> PutError<T> {
    /// The item, if the queue was full.
    pub fn into_inner(self) -> Option<T> {
        match self {
            PutError::Full(t) => Some(t),
            PutError::Failed(_) => None,
        }
    }

    /// Whether the queue was full.
    pub fn is_full(&self) -> bool {
        matches!(self, PutError::Full(_))
    }
}

impl<T> fmt::Display for PutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PutError::Full(_) => f.write_str("the queue is full"),
            PutError::Failed(e) => e.fmt(f),
        }
    }
}

impl<T: fmt::Debug> std::error::Error for PutError<T> {}

impl<T> From<PutError<T>> for Error {
    fn from(e: PutError<T>) -> Error {
        match e {
            PutError::Full(_) => Error::Full,
            PutError::Failed(e) => e,
        }
    }
}

fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// A multi-producer, multi-consumer FIFO queue between processes (Python's
/// `multiprocessing.Queue`), for any serde type `T`.
///
/// Pass it to children in `Process` args (clone it to keep one), or send it through a
/// [`Connection`](crate::Connection). See the [module docs](self) for how it differs from
/// Python's (no feeder thread; `put` can block while the shared buffer is full).
///
/// ```
/// use multiprocess::{Error, Queue};
///
/// let q = Queue::with_maxsize(2)?;
/// q.put(1)?;
/// q.put(2)?;
/// assert!(q.is_full());
/// // A full queue hands the item back.
/// assert_eq!(q.try_put(3).unwrap_err().into_inner(), Some(3));
/// assert_eq!(q.qsize(), 2);
/// assert_eq!(q.get()?, 1);
/// assert_eq!(q.get()?, 2);
/// assert!(matches!(q.try_get(), Err(Error::Empty)));
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub struct Queue<T> {
    ring: Arc<Ring>,
    closed: AtomicBool,
    _item: PhantomData<fn(T) -> T>,
}

impl<T> Queue<T> {
    /// An unbounded queue (items are limited only by the shared buffer, see the module docs).
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new() -> Result<Queue<T>> {
        Self::with_maxsize_and_buffer(0, DEFAULT_BUFFER_SIZE)
    }

    /// A queue that holds at most `maxsize` items (`0`: unbounded), Python's
    /// `Queue(maxsize)`.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn with_maxsize(maxsize: usize) -> Result<Queue<T>> {
        Self::with_maxsize_and_buffer(maxsize, DEFAULT_BUFFER_SIZE)
    }

    /// An unbounded queue with a shared buffer of `bytes` (rounded up to a power of two,
    /// between 64 KiB and 1 GiB). A larger buffer lets producers run further ahead.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn with_buffer_size(bytes: usize) -> Result<Queue<T>> {
        Self::with_maxsize_and_buffer(0, bytes)
    }

    /// A queue of at most `maxsize` items (`0`: unbounded) with a buffer of `bytes`.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn with_maxsize_and_buffer(maxsize: usize, bytes: usize) -> Result<Queue<T>> {
        Self::create(maxsize, bytes, false)
    }

    fn create(maxsize: usize, bytes: usize, joinable: bool) -> Result<Queue<T>> {
        Ok(Self::from_ring(Arc::new(Ring::create(
            bytes,
            maxsize as u64,
            joinable,
        )?)))
    }

    fn from_ring(ring: Arc<Ring>) -> Queue<T> {
        Queue {
            ring,
            closed: AtomicBool::new(false),
            _item: PhantomData,
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            Err(Error::Closed("queue"))
        } else {
            Ok(())
        }
    }

    /// How many items are in the queue: put and not yet taken. Approximate while other
    /// processes use the queue (as in Python).
    pub fn qsize(&self) -> usize {
        self.ring.len() as usize
    }

    /// Whether the queue holds no item (approximate, as [`qsize`](Self::qsize)).
    #[doc(alias = "empty")]
    pub fn is_empty(&self) -> bool {
        self.ring.len() == 0
    }

    /// Whether the queue holds `maxsize` items; always `false` for an unbounded queue
    /// (whose `put` may still wait while the shared buffer is full).
    #[doc(alias = "full")]
    pub fn is_full(&self) -> bool {
        let max = self.ring.maxsize();
        max > 0 && self.ring.len() >= max
    }

    /// The `maxsize` given at creation (`0`: unbounded).
    pub fn maxsize(&self) -> usize {
        self.ring.maxsize() as usize
    }

    /// Closes this handle: later `put`s and `get`s on it fail with [`Error::Closed`].
    /// Other handles (clones, other processes) are not affected, and items already put
    /// stay in the queue. As there is no feeder thread, nothing needs flushing.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Python's `join_thread`: waits for the feeder thread to flush. There is no feeder
    /// thread here (`put` writes straight into shared memory), so there is nothing to
    /// wait for; kept so that ported code reads the same.
    pub fn join_thread(&self) {}

    /// Python's `cancel_join_thread`: lets a process exit without flushing its buffered
    /// items. Nothing is ever buffered in the process here, so this does nothing and no
    /// item can be lost at exit.
    pub fn cancel_join_thread(&self) {}

    /// Whether [`close`](Self::close) was called on this handle.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

impl<T: Serialize> Queue<T> {
    fn put_until(&self, item: T, deadline: Option<Instant>) -> Result<(), PutError<T>> {
        if let Err(e) = self.check_open() {
            return Err(PutError::Failed(e));
        }
        match self.ring.put(&item, deadline) {
            Ok(Put::Done) => Ok(()),
            Ok(Put::Full) => Err(PutError::Full(item)),
            Err(e) => Err(PutError::Failed(e)),
        }
    }

    /// Puts an item, waiting as long as the queue is full (see the module docs for when
    /// that is). When it returns, the item is in shared memory: this process may exit.
    ///
    /// # Errors
    /// [`Error::Closed`] if this handle was closed, [`Error::Serialization`] if the item cannot be encoded.
    pub fn put(&self, item: T) -> Result<()> {
        self.put_until(item, None).map_err(Error::from)
    }

    /// Puts a copy of `item` and leaves it with you (as Python's `put` never takes the
    /// object): no clone is made, the item is encoded straight into the queue. Waits as
    /// [`put`](Self::put) does.
    ///
    /// ```
    /// # use multiprocess::Queue;
    /// let q = Queue::new()?;
    /// let report = "x".repeat(1 << 20);
    /// for _ in 0..3 {
    ///     q.put_ref(&report)?;
    /// }
    /// assert_eq!(q.qsize(), 3);
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`put`](Self::put).
    pub fn put_ref(&self, item: &T) -> Result<()> {
        self.check_open()?;
        match self.ring.put(item, None)? {
            Put::Done => Ok(()),
            Put::Full => Err(Error::Full),
        }
    }

    /// Puts an item if there is room for all of it now; otherwise hands it back in
    /// [`PutError::Full`] (Python's `put_nowait`), also while another producer is in the
    /// middle of a `put`. Never waits for a consumer: an item
    /// larger than the free space is `Full` (whatever part of it went out is discarded by
    /// the consumer).
    ///
    /// # Errors
    /// [`PutError::Full`] with the item if there is no room now; [`PutError::Failed`] as for [`put`](Self::put).
    #[doc(alias = "put_nowait")]
    pub fn try_put(&self, item: T) -> Result<(), PutError<T>> {
        self.put_until(item, Some(Instant::now()))
    }

    /// Puts an item, waiting at most `timeout` for room; then hands it back in
    /// [`PutError::Full`].
    ///
    /// # Errors
    /// [`PutError::Full`] with the item if there is no room within `timeout`; [`PutError::Failed`] as for [`put`](Self::put).
    pub fn put_timeout(&self, item: T, timeout: Duration) -> Result<(), PutError<T>> {
        self.put_until(item, deadline(timeout))
    }
}

impl<T: DeserializeOwned> Queue<T> {
    fn get_until(&self, deadline: Option<Instant>) -> Result<T> {
        self.check_open()?;
        self.ring.get(deadline)?.ok_or(Error::Empty)
    }

    /// Takes the oldest item, waiting as long as the queue is empty. An item that does not
    /// decode as `T` is consumed and reported as [`Error::Serialization`].
    ///
    /// # Errors
    /// [`Error::Closed`] if this handle was closed; [`Error::Serialization`] for an item that does not decode as `T` (it is consumed).
    pub fn get(&self) -> Result<T> {
        self.get_until(None)
    }

    /// Takes an item if one is there; otherwise [`Error::Empty`] (Python's `get_nowait`),
    /// also while another consumer is in the middle of a `get`.
    ///
    /// # Errors
    /// [`Error::Empty`] if no item is there now; otherwise as for `get`.
    #[doc(alias = "get_nowait")]
    pub fn try_get(&self) -> Result<T> {
        self.get_until(Some(Instant::now()))
    }

    /// Takes an item, waiting at most `timeout` for one to begin arriving; then
    /// [`Error::Empty`] (as Python's `get(timeout=)` raises `queue.Empty`).
    ///
    /// # Errors
    /// [`Error::Empty`] if no item begins to arrive within `timeout`; otherwise as for `get`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        self.get_until(deadline(timeout))
    }
}

/// Receiving into the caller's buffer: for large items (images, file chunks), the bytes
/// are copied once out of the shared ring into memory the caller reuses from item to
/// item, and the value is decoded from there, borrowing what it can (as
/// [`Connection::recv_borrowed`](crate::Connection::recv_borrowed) does for a pipe).
impl<T> Queue<T> {
    fn get_borrowed_until<'b, U: Deserialize<'b>>(
        &self,
        buf: &'b mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<U> {
        self.check_open()?;
        self.ring.get_raw(deadline, buf)?.ok_or(Error::Empty)?;
        crate::reduction::decode_exact(buf)
    }

    /// Takes the oldest item (waiting as long as the queue is empty), copies its bytes
    /// into `buf` (cleared first; its memory is reused, so a loop that gets item after
    /// item allocates nothing once `buf` is big enough) and decodes it from there as a
    /// `U` that may borrow from `buf`: `&[u8]` for a `Vec<u8>` item (no copy beyond the
    /// one out of the ring), `&str` for a `String`, a struct with borrowed fields
    /// for one with owned fields, or `T` itself. `U` must be encoded as `T` is.
    ///
    /// ```
    /// use multiprocess::{Process, Queue};
    ///
    /// fn produce(q: Queue<Vec<u8>>) {
    ///     for i in 0..3u8 {
    ///         q.put(vec![i; 1 << 20]).unwrap();
    ///     }
    /// }
    ///
    /// let q: Queue<Vec<u8>> = Queue::new()?;
    /// let p = Process::new(produce, q.clone());
    /// p.start()?;
    /// let mut buf = Vec::new();
    /// for i in 0..3u8 {
    ///     let image: &[u8] = q.get_borrowed(&mut buf)?; // a view into `buf`
    ///     assert_eq!(image.len(), 1 << 20);
    ///     assert!(image.iter().all(|&b| b == i));
    /// }
    /// p.join()?;
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Closed`] if this handle was closed; [`Error::Serialization`] for an item
    /// that does not decode as `U` (it is consumed).
    #[doc(alias = "recv_bytes_into")]
    pub fn get_borrowed<'b, U: Deserialize<'b>>(&self, buf: &'b mut Vec<u8>) -> Result<U> {
        self.get_borrowed_until(buf, None)
    }

    /// [`get_borrowed`](Self::get_borrowed) if an item is there now; otherwise
    /// [`Error::Empty`].
    ///
    /// # Errors
    /// [`Error::Empty`] if no item is there now; otherwise as for `get_borrowed`.
    pub fn try_get_borrowed<'b, U: Deserialize<'b>>(&self, buf: &'b mut Vec<u8>) -> Result<U> {
        self.get_borrowed_until(buf, Some(Instant::now()))
    }

    /// [`get_borrowed`](Self::get_borrowed), waiting at most `timeout` for an item to
    /// begin arriving; then [`Error::Empty`].
    ///
    /// # Errors
    /// [`Error::Empty`] if no item begins to arrive within `timeout`; otherwise as for
    /// `get_borrowed`.
    pub fn get_borrowed_timeout<'b, U: Deserialize<'b>>(
        &self,
        buf: &'b mut Vec<u8>,
        timeout: Duration,
    ) -> Result<U> {
        self.get_borrowed_until(buf, deadline(timeout))
    }
}

impl<T> Clone for Queue<T> {
    /// Another handle to the same queue (open, whatever the state of this one).
    fn clone(&self) -> Queue<T> {
        Queue::from_ring(self.ring.clone())
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("qsize", &self.qsize())
            .field("maxsize", &self.maxsize())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.ring.mapping().serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = crate::reduction::deserialize_sealed(d)?;
        let ring = Ring::from_mapping(map).map_err(serde::de::Error::custom)?;
        Ok(Queue::from_ring(Arc::new(ring)))
    }
}

/// Python's `multiprocessing.SimpleQueue`: an unbounded queue with only `put`, `get`,
/// `is_empty` and `close`. The same shared ring as [`Queue`] (so the same semantics: no
/// feeder thread, `put` waits while the shared buffer is full).
///
/// ```
/// use multiprocess::SimpleQueue;
/// let q = SimpleQueue::new()?;
/// q.put(vec![1u8, 2, 3])?;
/// assert_eq!(q.get()?, vec![1, 2, 3]);
/// assert!(q.is_empty());
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub struct SimpleQueue<T> {
    queue: Queue<T>,
}

impl<T> SimpleQueue<T> {
    /// A new empty queue.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new() -> Result<SimpleQueue<T>> {
        Ok(SimpleQueue {
            queue: Queue::new()?,
        })
    }

    /// Whether the queue holds no item (approximate).
    #[doc(alias = "empty")]
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Closes this handle (later `put`/`get` on it fail with [`Error::Closed`]).
    pub fn close(&self) {
        self.queue.close()
    }
}

impl<T: Serialize> SimpleQueue<T> {
    /// Puts an item (waits only while the shared buffer is full).
    ///
    /// # Errors
    /// [`Error::Closed`] if this handle was closed, [`Error::Serialization`] if the item cannot be encoded.
    pub fn put(&self, item: T) -> Result<()> {
        self.queue.put(item)
    }
}

impl<T: DeserializeOwned> SimpleQueue<T> {
    /// Takes the oldest item, waiting for one.
    ///
    /// # Errors
    /// [`Error::Closed`] if this handle was closed; [`Error::Serialization`] for an item that does not decode as `T` (it is consumed).
    pub fn get(&self) -> Result<T> {
        self.queue.get()
    }

    /// Takes an item if one is there; otherwise [`Error::Empty`].
    ///
    /// # Errors
    /// [`Error::Empty`] if no item is there now; otherwise as for `get`.
    pub fn try_get(&self) -> Result<T> {
        self.queue.try_get()
    }

    /// Takes an item, waiting at most `timeout`; then [`Error::Empty`].
    ///
    /// # Errors
    /// [`Error::Empty`] if no item begins to arrive within `timeout`; otherwise as for `get`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        self.queue.get_timeout(timeout)
    }
}

impl<T> SimpleQueue<T> {
    /// Takes the oldest item into `buf` and decodes it from there, borrowing what it can
    /// (see [`Queue::get_borrowed`]).
    ///
    /// ```
    /// use multiprocess::SimpleQueue;
    /// let q: SimpleQueue<String> = SimpleQueue::new()?;
    /// q.put("a line of text".to_string())?;
    /// let mut buf = Vec::new();
    /// let line: &str = q.get_borrowed(&mut buf)?;
    /// assert_eq!(line, "a line of text");
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Queue::get_borrowed`].
    pub fn get_borrowed<'b, U: Deserialize<'b>>(&self, buf: &'b mut Vec<u8>) -> Result<U> {
        self.queue.get_borrowed(buf)
    }
}

impl<T> Clone for SimpleQueue<T> {
    fn clone(&self) -> Self {
        SimpleQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T> fmt::Debug for SimpleQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleQueue")
            .field("empty", &self.is_empty())
            .finish()
    }
}

impl<T> Serialize for SimpleQueue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.queue.serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for SimpleQueue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(SimpleQueue {
            queue: Queue::deserialize(d)?,
        })
    }
}

/// Python's `multiprocessing.JoinableQueue`: a [`Queue`] (all its methods, through
/// `Deref`) that also counts unfinished tasks. Every `put` adds one; a consumer calls
/// [`task_done`](Self::task_done) when it has finished with an item it took, and
/// [`join`](Self::join) waits until every item put has been marked done.
///
/// # At-least-once delivery
/// Like a message broker that re-delivers unacknowledged messages, a `JoinableQueue`
/// remembers who took each item until it is marked done: an item taken by a process that
/// dies (even by `SIGKILL`) before its `task_done` is delivered again, by a later `get` of
/// another consumer (a waiting `get` looks for such items every
/// [`HOLDER_CHECK_INTERVAL`](crate::synchronize::HOLDER_CHECK_INTERVAL)). So an item may
/// be processed more than once, never lost. What this covers, and its limits:
/// * The queue keeps a copy of each taken item of up to 32 KiB encoded, for up to 64
///   items taken and not yet done at once (across all consumers). A larger item, or one
///   taken while 64 others are in flight, is still delivered, but its taker's death loses
///   it: `join` then ends with [`Error::TasksLost`] (never waits for ever) once only such
///   items remain unfinished; a `task_done` for each lost item lets `join` end normally.
/// * A taker is recorded per thread: `task_done` settles an item the calling thread took
///   (else another in flight; the count itself is Python's), and a thread that ends
///   before its item is marked done counts as a dead taker, so its item is delivered
///   again. Call `task_done` from the thread that called `get`.
/// * All processes using the queue must share one pid namespace (takers are recorded by
///   thread id).
///
/// ```
/// use multiprocess::{JoinableQueue, Process};
///
/// fn worker(q: JoinableQueue<u32>) {
///     while let Ok(n) = q.get() {
///         if n == 0 { q.task_done().unwrap(); break; }
///         q.task_done().unwrap();
///     }
/// }
///
/// let q = JoinableQueue::new()?;
/// let p = Process::new(worker, q.clone());
/// p.start()?;
/// for n in [3, 2, 1, 0] { q.put(n)?; }
/// q.join()?; // every item taken and done
/// p.join()?;
/// assert!(q.task_done().is_err()); // one too many
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub struct JoinableQueue<T> {
    queue: Queue<T>,
}

impl<T> JoinableQueue<T> {
    /// An unbounded joinable queue.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new() -> Result<JoinableQueue<T>> {
        Self::with_maxsize(0)
    }

    /// A joinable queue of at most `maxsize` items (`0`: unbounded).
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn with_maxsize(maxsize: usize) -> Result<JoinableQueue<T>> {
        Ok(JoinableQueue {
            queue: Queue::create(maxsize, DEFAULT_BUFFER_SIZE, true)?,
        })
    }

    /// Marks one item taken from the queue as finished. Calling it more times than items
    /// were put is [`Error::TaskDoneTooOften`] (Python's `ValueError`).
    ///
    /// # Errors
    /// [`Error::TaskDoneTooOften`] if every item put is already marked done.
    pub fn task_done(&self) -> Result<()> {
        if self.queue.ring.task_done() {
            Ok(())
        } else {
            Err(Error::TaskDoneTooOften)
        }
    }

    /// Waits until every item put has been marked done by [`task_done`](Self::task_done).
    ///
    /// An item whose taker died before `task_done` is delivered again to another consumer
    /// (see [at-least-once delivery](Self#at-least-once-delivery)), so `join` goes on
    /// waiting for it; it never waits for items that nobody can finish.
    ///
    /// # Errors
    /// [`Error::TasksLost`] as soon as every unfinished task is an item taken by a process
    /// that died and that cannot be delivered again.
    pub fn join(&self) -> Result<()> {
        self.queue.ring.join(None).map(|_| ())
    }

    /// Like [`join`](Self::join), waiting at most `timeout`; `Ok(false)` if tasks remain.
    ///
    /// # Errors
    /// As [`join`](Self::join).
    pub fn join_timeout(&self, timeout: Duration) -> Result<bool> {
        self.queue.ring.join(deadline(timeout))
    }

    /// How many items were put and not yet marked done.
    pub fn unfinished_tasks(&self) -> usize {
        self.queue.ring.unfinished() as usize
    }
}

impl<T> std::ops::Deref for JoinableQueue<T> {
    type Target = Queue<T>;
    fn deref(&self) -> &Queue<T> {
        &self.queue
    }
}

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T> fmt::Debug for JoinableQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinableQueue")
            .field("qsize", &self.qsize())
            .field("unfinished_tasks", &self.unfinished_tasks())
            .finish()
    }
}

impl<T> Serialize for JoinableQueue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.queue.serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for JoinableQueue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let queue = Queue::deserialize(d)?;
        if !queue.ring.joinable() {
            return Err(serde::de::Error::custom(
                "a Queue arrived where a JoinableQueue was expected",
            ));
        }
        Ok(JoinableQueue { queue })
    }
}
