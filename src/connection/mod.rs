//! L2: connections between processes — Python's `multiprocessing.connection`.
//!
//! A [`Connection`] carries whole messages over a socket, framed exactly as CPython frames
//! them (a 4-byte big-endian length, or `-1` and an 8-byte length over 2 GiB − 1), so a
//! Rust and a Python program can exchange bytes, and CPython can serve as a test peer.
//! [`pipe`] makes a connected pair; a `Connection` placed in `Process` args, or sent
//! through another connection, arrives usable in the other process.
//!
//! Between unrelated programs, [`Listener`] and [`Client`] connect over TCP or Unix
//! sockets and authenticate each other with an [`AuthKey`] using CPython's HMAC handshake
//! ([`auth`]), so either side may be a Python `multiprocessing.connection` peer; exchange
//! plain data with Python through [`Connection::send_pickle`] / [`Connection::recv_pickle`].
//! [`wait`] watches many connections at once.
//!
//! ```
//! let (a, b) = multiprocess::pipe()?;
//! a.send(&("hello", 42u32))?;
//! let (text, n): (String, u32) = b.recv()?;
//! assert_eq!((text.as_str(), n), ("hello", 42));
//! b.send_bytes(b"raw bytes")?;
//! assert_eq!(a.recv_bytes()?, b"raw bytes");
//! # Ok::<(), multiprocess::Error>(())
//! ```

mod acceptor;
mod aio;
pub mod auth;
pub mod framing;
mod listener;

pub(crate) use listener::Interrupter;
pub use listener::{
    Address, AuthKey, Client, Listener, ListenerBuilder, ToAddress, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_MESSAGE, DEFAULT_SOCKET_MODE,
};

use crate::error::{Error, Result};
use crate::reduction;
use crate::sys::fd::poll_readable;
use crate::sys::socket::{self, MAX_FDS_PER_MSG};
use framing::{parse_header, Header, Parsed};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Size of the read-ahead buffer. Payloads larger than half of it are read straight into
/// the destination.
const READ_BUF: usize = 64 * 1024;
/// The largest buffer [`Connection::recv_bytes_reusing`] keeps from one message to the next.
const REUSE_MAX: usize = 16 << 20;

/// Payloads at least this large are received into memory backed by huge pages.
const HUGE_PAGE_THRESHOLD: usize = 8 << 20;

/// The most passed descriptors (`SCM_RIGHTS`) a connection holds for messages not yet
/// received; descriptors beyond it are closed on arrival (and the message that declared
/// them fails to decode).
pub const MAX_QUEUED_FDS: usize = 1024;

/// One end of a connection: whole messages, in order, in both directions (or one, for
/// [`pipe_simplex`]).
///
/// All methods take `&self`: one thread may send while another receives. Concurrent
/// senders (or receivers) are serialised message by message.
pub struct Connection {
    fd: OwnedFd,
    readable: bool,
    writable: bool,
    max_message: u64,
    /// Whether passed descriptors are kept (pipes) or closed on arrival (connections
    /// made by a `Listener` or `Client`, whose peer is not trusted with our table).
    carries_fds: bool,
    reader: Mutex<Reader>,
    /// Held while a frame is written; holds the rest of a frame that a dropped
    /// [`send_async`](Self::send_async) future began, written before anything else.
    writer: Mutex<Vec<u8>>,
}

struct Reader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes received from the socket so far: the stream offset just past `buf[end]`.
    received: u64,
    /// Passed descriptors, each tagged with the stream offset of the last byte of the
    /// read that brought it. The sender attaches descriptors to the first bytes of their
    /// frame, and a Unix stream read ends with the segment that carries descriptors, so
    /// the tag lies inside the frame the descriptors belong to.
    fds: VecDeque<(u64, OwnedFd)>,
    /// Set when the stream can no longer be trusted (a length violation or a truncated
    /// frame): every later read fails with this reason, as CPython marks it unreadable.
    broken: Option<String>,
    /// The payload buffer of the last [`Connection::recv`], kept (up to [`REUSE_MAX`])
    /// for the next one: no fresh allocation and no fresh pages per large message.
    spare: Vec<u8>,
}

impl Reader {
    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The stream offset of the next byte to consume.
    fn offset(&self) -> u64 {
        self.received - (self.end - self.start) as u64
    }

    /// Gives the read-ahead buffer its first capacity, starts it over when everything in
    /// it has been consumed, and moves the unread bytes to the front when fewer than
    /// `need` bytes from `start` would fit in its capacity. Never allocates beyond
    /// [`READ_BUF`]; growing is the caller's decision.
    fn make_room(&mut self, need: usize) {
        if self.buf.capacity() == 0 {
            self.buf = Vec::with_capacity(READ_BUF);
        }
        if self.start == self.end {
            self.buf.clear();
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.buf.capacity() - self.start < need {
            let (s, e) = (self.start, self.end);
            self.buf.copy_within(s..e, 0);
            self.buf.truncate(e - s);
            self.start = 0;
            self.end = e - s;
        }
    }

    /// Takes the descriptors of the frame that started at stream offset `start` and has
    /// just been consumed whole; closes descriptors of earlier frames that nobody took.
    fn frame_fds(&mut self, start: u64) -> VecDeque<OwnedFd> {
        let end = self.offset();
        let mut mine = VecDeque::new();
        while let Some((tag, _)) = self.fds.front() {
            if *tag >= end {
                break;
            }
            let (tag, fd) = self.fds.pop_front().unwrap_or_else(|| unreachable!());
            if tag >= start {
                mine.push_back(fd);
            }
        }
        mine
    }
}

/// Socket buffer size asked for on pipes: larger than the default (208 KiB) so that big
/// messages need fewer wake-ups; the kernel caps it at `net.core.wmem_max`.
const PIPE_SOCKET_BUFFER: usize = 4 << 20;

fn tune(fd: &OwnedFd) {
    // Only a performance hint: the defaults work too.
    let _ = socket::set_buffer_sizes(fd.as_fd(), PIPE_SOCKET_BUFFER);
}

/// Makes a connected pair of duplex connections (Python's `Pipe()`).
///
/// ```
/// let (left, right) = multiprocess::pipe()?;
/// left.send(&1u8)?;
/// right.send(&2u8)?;
/// assert_eq!(right.recv::<u8>()? + left.recv::<u8>()?, 3);
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[doc(alias = "Pipe")]
pub fn pipe() -> Result<(Connection, Connection)> {
    let (a, b) = socket::socketpair(socket::Kind::Stream)?;
    tune(&a);
    tune(&b);
    Ok((
        Connection::from_fd(a, true, true),
        Connection::from_fd(b, true, true),
    ))
}

/// Makes a one-way pair `(receiver, sender)` (Python's `Pipe(duplex=False)`).
///
/// ```
/// let (rx, tx) = multiprocess::pipe_simplex()?;
/// tx.send_bytes(b"one way")?;
/// assert_eq!(rx.recv_bytes()?, b"one way");
/// assert!(rx.send_bytes(b"nope").is_err());
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[doc(alias = "Pipe")]
pub fn pipe_simplex() -> Result<(Connection, Connection)> {
    let (r, w) = socket::socketpair(socket::Kind::Stream)?;
    tune(&r);
    tune(&w);
    socket::shutdown(r.as_fd(), libc::SHUT_WR)?;
    socket::shutdown(w.as_fd(), libc::SHUT_RD)?;
    Ok((
        Connection::from_fd(r, true, false),
        Connection::from_fd(w, false, true),
    ))
}

/// Waits until at least one of `conns` has a message (or end of stream) to read, or
/// `timeout` passes (`None`: wait for ever); returns the indices of the ready ones, in
/// order, empty on timeout (Python's `multiprocessing.connection.wait`).
///
/// Data a connection has already buffered counts as ready without asking the system.
/// An empty list returns an empty result at once.
///
/// ```
/// use multiprocess::connection::wait;
/// use std::time::Duration;
/// let (a1, b1) = multiprocess::pipe()?;
/// let (a2, b2) = multiprocess::pipe()?;
/// a2.send_bytes(b"x")?;
/// assert_eq!(wait(&[&b1, &b2], Some(Duration::from_secs(5)))?, vec![1]);
/// assert_eq!(wait(&[&b1], Some(Duration::ZERO))?, Vec::<usize>::new());
/// # drop((a1, b2));
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub fn wait(conns: &[&Connection], timeout: Option<Duration>) -> Result<Vec<usize>> {
    let mut ready = Vec::new();
    if conns.is_empty() {
        return Ok(ready);
    }
    for (i, c) in conns.iter().enumerate() {
        c.check_readable()?;
        // A reader busy in another thread is not buffered-ready; poll decides for it.
        if let Ok(r) = c.reader.try_lock() {
            if r.start != r.end || r.broken.is_some() {
                ready.push(i);
            }
        }
    }
    let timeout = if ready.is_empty() {
        timeout
    } else {
        Some(Duration::ZERO)
    };
    let fds: Vec<BorrowedFd<'_>> = conns.iter().map(|c| c.fd.as_fd()).collect();
    let polled = poll_readable(&fds, timeout)?;
    for (i, p) in polled.iter().enumerate() {
        if p.readable && !ready.contains(&i) {
            ready.push(i);
        }
    }
    ready.sort_unstable();
    Ok(ready)
}

impl Connection {
    /// Wraps a connected stream socket (Unix or TCP).
    pub(crate) fn from_fd(fd: OwnedFd, readable: bool, writable: bool) -> Connection {
        Connection {
            fd,
            readable,
            writable,
            max_message: u64::MAX,
            carries_fds: true,
            reader: Mutex::new(Reader {
                buf: Vec::new(),
                start: 0,
                end: 0,
                received: 0,
                fds: VecDeque::new(),
                broken: None,
                spare: Vec::new(),
            }),
            writer: Mutex::new(Vec::new()),
        }
    }

    /// Makes this connection close every descriptor a peer passes, on arrival.
    pub(crate) fn refuse_descriptors(&mut self) {
        self.carries_fds = false;
    }

    /// Books `n` bytes and the descriptors `got` that one read brought.
    fn arrived(&self, r: &mut Reader, n: usize, got: Vec<OwnedFd>) {
        r.received += n as u64;
        if !self.carries_fds || n == 0 {
            return;
        }
        let tag = r.received - 1;
        let room = MAX_QUEUED_FDS.saturating_sub(r.fds.len());
        // Beyond the bound, descriptors are closed here (dropped with `got`).
        r.fds.extend(got.into_iter().take(room).map(|fd| (tag, fd)));
    }

    /// Whether this end can receive.
    pub fn readable(&self) -> bool {
        self.readable
    }

    /// Whether this end can send.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Refuses (before allocating) any incoming message larger than `max` bytes; `None`
    /// removes the limit. A refused message leaves the connection unreadable, as in
    /// CPython, because its payload was not consumed.
    pub fn set_max_message_size(&mut self, max: Option<u64>) {
        self.max_message = max.unwrap_or(u64::MAX);
    }

    /// The limit set by [`set_max_message_size`](Self::set_max_message_size).
    pub fn max_message_size(&self) -> Option<u64> {
        (self.max_message != u64::MAX).then_some(self.max_message)
    }

    /// Sends a value, encoded with the internal format. Handles inside it (connections…)
    /// travel as descriptors.
    pub fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<()> {
        let enc = reduction::encode(value)?;
        self.send_frame(&enc.bytes, &enc.fds)
    }

    /// Receives a value sent with [`send`](Self::send).
    ///
    /// The connection keeps the receive buffer of the last message (up to 16 MiB) for
    /// the next one; the value is decoded from it.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<T> {
        let mut buf = std::mem::take(&mut self.lock_reader().spare);
        let (mut r, mut fds) = self.recv_into_vec_locked(&mut buf)?;
        let res = reduction::decode(&buf, &mut fds);
        if buf.capacity() <= REUSE_MAX {
            r.spare = buf;
        }
        res
    }

    /// Receives a value sent with [`send`](Self::send) into `buf`, reusing its memory
    /// from one message to the next (no fresh allocation and no fresh pages per message),
    /// and decodes it from there. The value may borrow from `buf`: `&[u8]` (with
    /// `serde_bytes`), `&str` and `#[serde(borrow)]` fields are views into the received
    /// message, not copies. Owned parts (`Vec<u8>`, `String`) are one copy each.
    ///
    /// For raw bytes without encoding, see [`recv_bytes_into`](Self::recv_bytes_into).
    ///
    /// ```
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Frame<'a> {
    ///     id: u64,
    ///     #[serde(borrow, with = "serde_bytes")]
    ///     pixels: &'a [u8],
    /// }
    /// let (a, b) = multiprocess::pipe()?;
    /// let mut buf = Vec::new();
    /// for id in 0..3 {
    ///     a.send(&Frame { id, pixels: &[7; 4096] })?;
    ///     let f: Frame = b.recv_borrowed(&mut buf)?;
    ///     assert_eq!((f.id, f.pixels.len()), (id, 4096));
    /// }
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`recv`](Self::recv): [`Error::Eof`], [`Error::Io`], [`Error::Protocol`] for a
    /// broken frame, [`Error::Serialization`] for a message that does not decode as `T`
    /// (the connection goes on with the next message).
    pub fn recv_borrowed<'a, T: Deserialize<'a>>(&self, buf: &'a mut Vec<u8>) -> Result<T> {
        let (r, mut fds) = self.recv_into_vec_locked(buf)?;
        drop(r);
        let buf: &'a Vec<u8> = buf;
        reduction::decode(buf, &mut fds)
    }

    /// Receives a value that has already arrived, without waiting: a missing or partial
    /// message is an error (used after the sender has exited).
    pub(crate) fn recv_nowait<T: DeserializeOwned>(&self) -> Result<T> {
        let (msg, mut fds) = self.recv_frame_with_fds(self.max_message, true)?;
        reduction::decode(&msg, &mut fds)
    }

    /// Sends a value as a Python pickle (protocol 3), as CPython's `Connection.send` does:
    /// a Python peer gets it from `conn.recv()`. See [`reduction::pickle`] for how Rust and
    /// Python types correspond. Handles (connections, descriptors) cannot be pickled.
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// let (a, b) = multiprocess::pipe()?;
    /// a.send_pickle(&BTreeMap::from([("answer", 42)]))?;
    /// let got: BTreeMap<String, i64> = b.recv_pickle()?;
    /// assert_eq!(got["answer"], 42);
    /// // A value of the wrong shape is a Serialization error; the next message still arrives.
    /// a.send_pickle(&"not a number")?;
    /// assert!(matches!(b.recv_pickle::<i64>(), Err(multiprocess::Error::Serialization(_))));
    /// a.send_pickle(&7)?;
    /// assert_eq!(b.recv_pickle::<i64>()?, 7);
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    #[doc(alias = "send")]
    pub fn send_pickle<T: Serialize>(&self, value: &T) -> Result<()> {
        let bytes = reduction::pickle::to_vec(value)?;
        self.send_frame(&bytes, &[])
    }

    /// Receives one pickled message (protocols 0–5, as CPython's `Connection.send` writes)
    /// into a typed value.
    #[doc(alias = "recv")]
    pub fn recv_pickle<T: DeserializeOwned>(&self) -> Result<T> {
        reduction::pickle::from_slice(&self.recv_bytes()?)
    }

    /// Receives one pickled message as a dynamic [`reduction::pickle::Value`], for data
    /// whose shape is not known in advance.
    pub fn recv_pickle_value(&self) -> Result<reduction::pickle::Value> {
        reduction::pickle::value_from_slice(&self.recv_bytes()?)
    }

    /// Sends raw bytes as one message (no encoding, no copy into an intermediate buffer).
    pub fn send_bytes(&self, buf: &[u8]) -> Result<()> {
        self.send_frame(buf, &[])
    }

    /// Receives one message as raw bytes. At end of stream: [`Error::Eof`].
    pub fn recv_bytes(&self) -> Result<Vec<u8>> {
        self.recv_frame(self.max_message, false)
    }

    /// Receives one message of at most `maxlength` bytes; a longer one is an error and
    /// leaves the connection unreadable, as in CPython (`recv_bytes(maxlength)`).
    #[doc(alias = "recv_bytes")]
    pub fn recv_bytes_max(&self, maxlength: usize) -> Result<Vec<u8>> {
        self.recv_frame((maxlength as u64).min(self.max_message), false)
    }

    /// Receives one message into `buf` and returns its length. If it does not fit, the
    /// error [`Error::BufferTooShort`] carries the whole message and the connection stays
    /// usable.
    ///
    /// ```
    /// let (a, b) = multiprocess::pipe()?;
    /// a.send_bytes(b"0123456789")?;
    /// let mut small = [0u8; 4];
    /// match b.recv_bytes_into(&mut small) {
    ///     Err(multiprocess::Error::BufferTooShort(msg)) => assert_eq!(msg, b"0123456789"),
    ///     other => panic!("{other:?}"),
    /// }
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    pub fn recv_bytes_into(&self, buf: &mut [u8]) -> Result<usize> {
        self.check_readable()?;
        let mut r = self.lock_reader();
        if let Some(why) = &r.broken {
            return Err(Error::protocol(format!("connection is unreadable: {why}")));
        }
        let start = r.offset();
        let res = self
            .read_header(&mut r, self.max_message, false)
            .and_then(|len| {
                if len <= buf.len() {
                    // Fits: straight into the caller's buffer, no allocation.
                    self.read_payload_into(&mut r, &mut buf[..len], false)?;
                    Ok(len)
                } else {
                    let msg = self.read_payload(&mut r, len, false)?;
                    Err(Error::BufferTooShort(msg))
                }
            });
        if let Err(e) = &res {
            note_error(&mut r, e);
        }
        if matches!(res, Ok(_) | Err(Error::BufferTooShort(_))) {
            drop(r.frame_fds(start));
        }
        res
    }

    /// Whether a message (or end of stream) can be read without blocking, waiting up to
    /// `timeout` for one; `None` waits for ever.
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool> {
        self.check_readable()?;
        {
            let r = self.lock_reader();
            if r.start != r.end {
                return Ok(true);
            }
        }
        let ready = poll_readable(&[self.fd.as_fd()], timeout)?;
        Ok(ready[0].readable)
    }

    /// Whether received bytes are waiting in this connection's read buffer (a poll of the
    /// descriptor alone would not show them).
    pub(crate) fn has_buffered(&self) -> bool {
        let r = self.lock_reader();
        r.start != r.end
    }

    /// Closes the connection (dropping it does the same).
    pub fn close(self) {}

    fn check_readable(&self) -> Result<()> {
        if self.readable {
            Ok(())
        } else {
            Err(Error::Io(io::Error::new(
                io::ErrorKind::Unsupported,
                "connection is write-only",
            )))
        }
    }

    fn lock_reader(&self) -> MutexGuard<'_, Reader> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one frame: header and payload in one `sendmsg` where possible, descriptors
    /// attached to the first bytes.
    pub(crate) fn send_frame(&self, payload: &[u8], fds: &[RawFd]) -> Result<()> {
        if !self.writable {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::Unsupported,
                "connection is read-only",
            )));
        }
        let header = Header::for_len(payload.len() as u64);
        let head = header.as_bytes();
        let total = head.len() + payload.len();
        let mut rest = self.lock_writer();
        if !rest.is_empty() {
            aio::flush_blocking(self, &mut rest)?;
        }
        let mut sent = 0usize;
        let mut fds_left = fds;
        while sent < total {
            let chunk = &fds_left[..fds_left.len().min(MAX_FDS_PER_MSG)];
            let more_fds_after = fds_left.len() > chunk.len();
            // The unsent rest of header + payload, as at most two slices.
            let (first, second): (&[u8], &[u8]) = if sent < head.len() {
                (&head[sent..], payload)
            } else {
                (&payload[sent - head.len()..], &[])
            };
            let (first, second) = if more_fds_after {
                // Leave bytes for the remaining descriptors to ride on.
                (&first[..1], &[][..])
            } else {
                (first, second)
            };
            let iov = [IoSlice::new(first), IoSlice::new(second)];
            let n_iov = if second.is_empty() { 1 } else { 2 };
            let n = socket::sendmsg(self.fd.as_fd(), &iov[..n_iov], chunk, false)?;
            if n > 0 {
                fds_left = &fds_left[chunk.len()..];
            }
            sent += n;
        }
        Ok(())
    }

    /// Writes several frames with as few `sendmsg`s as the socket allows (one, as a rule):
    /// for a peer that is sent many small messages at once, one system call and one
    /// wake-up instead of one per message. Large payloads go out one by one, uncopied.
    pub(crate) fn send_frames(&self, payloads: &[&[u8]]) -> Result<()> {
        const COALESCE_MAX: usize = 64 * 1024;
        if payloads.len() <= 1 || payloads.iter().any(|p| p.len() > COALESCE_MAX) {
            return payloads.iter().try_for_each(|p| self.send_frame(p, &[]));
        }
        if !self.writable {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::Unsupported,
                "connection is read-only",
            )));
        }
        let mut all = Vec::with_capacity(payloads.iter().map(|p| p.len() + 12).sum());
        for p in payloads {
            all.extend_from_slice(Header::for_len(p.len() as u64).as_bytes());
            all.extend_from_slice(p);
        }
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut sent = 0;
        while sent < all.len() {
            let n = socket::sendmsg(self.fd.as_fd(), &[IoSlice::new(&all[sent..])], &[], false)?;
            if n == 0 {
                return Err(Error::Io(io::ErrorKind::WriteZero.into()));
            }
            sent += n;
        }
        Ok(())
    }

    /// Reads more bytes into the read-ahead buffer; returns how many (0 at end of file).
    ///
    /// The buffer's length is always `end`: the kernel writes into its spare capacity,
    /// which is never zero-filled first (in a freshly forked child, zeroing 64 KiB would
    /// cost sixteen copy-on-write page faults before the first message is read).
    fn fill(&self, r: &mut Reader, nowait: bool) -> Result<usize> {
        // Room for at least one more byte after what is buffered.
        r.make_room(r.end - r.start + 1);
        debug_assert_eq!(r.buf.len(), r.end);
        let mut got = Vec::new();
        let n = socket::recvmsg_append(self.fd.as_fd(), &mut r.buf, usize::MAX, &mut got, nowait)?;
        r.end += n;
        self.arrived(r, n, got);
        Ok(n)
    }

    /// Reads one frame (closing any descriptors that came with it: raw bytes declare
    /// none).
    pub(crate) fn recv_frame(&self, limit: u64, nowait: bool) -> Result<Vec<u8>> {
        self.recv_frame_with_fds(limit, nowait).map(|(m, _)| m)
    }

    /// Reads one frame with the descriptors that came with it, and only those.
    fn recv_frame_with_fds(
        &self,
        limit: u64,
        nowait: bool,
    ) -> Result<(Vec<u8>, VecDeque<OwnedFd>)> {
        let mut msg = Vec::new();
        let (r, fds) = self.recv_locked(limit, nowait, &mut msg)?;
        drop(r);
        Ok((msg, fds))
    }

    /// Reads and checks one frame header; returns the payload length.
    fn read_header(&self, r: &mut Reader, limit: u64, nowait: bool) -> Result<usize> {
        let mut started = r.start != r.end;
        let len = loop {
            match parse_header(r.buffered()) {
                Parsed::NeedMore(_) => {
                    let n = self.fill(r, nowait).map_err(|e| {
                        if started
                            && matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
                        {
                            truncated()
                        } else {
                            e
                        }
                    })?;
                    if n == 0 {
                        return Err(if started || r.start != r.end {
                            truncated()
                        } else {
                            Error::Eof
                        });
                    }
                    started = true;
                }
                Parsed::Frame { header_len, len } => {
                    r.start += header_len;
                    break len;
                }
                Parsed::Invalid(n) => {
                    return Err(Error::protocol(format!("invalid message length {n}")))
                }
            }
        };
        if len > limit {
            return Err(Error::protocol(format!(
                "bad message length: {len} bytes exceeds the limit of {limit}"
            )));
        }
        usize::try_from(len)
            .map_err(|_| Error::protocol(format!("message of {len} bytes does not fit in memory")))
    }

    /// Reads a payload of `len` bytes into `dst` (exactly `len` long), buffered bytes
    /// first, the rest straight from the socket (never reading past the frame).
    fn read_payload_into(&self, r: &mut Reader, dst: &mut [u8], nowait: bool) -> Result<()> {
        let take = dst.len().min(r.end - r.start);
        dst[..take].copy_from_slice(&r.buf[r.start..r.start + take]);
        r.start += take;
        let mut filled = take;
        while filled < dst.len() {
            let mut got = Vec::new();
            let n = socket::recvmsg(self.fd.as_fd(), &mut dst[filled..], &mut got, nowait)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        truncated()
                    } else {
                        Error::Io(e)
                    }
                })?;
            self.arrived(r, n, got);
            if n == 0 {
                return Err(truncated());
            }
            filled += n;
        }
        Ok(())
    }

    /// Reads a payload of `len` bytes into a new vector.
    fn read_payload(&self, r: &mut Reader, len: usize, nowait: bool) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_payload_to(r, len, nowait, &mut out)?;
        Ok(out)
    }

    /// Receives one message into `buf` (replacing what it held), reusing its memory: for
    /// loops that receive many large messages, whose fresh pages would otherwise cost a
    /// page fault each. A buffer that one huge message made larger than [`REUSE_MAX`] is
    /// let go first rather than kept for ever.
    pub(crate) fn recv_bytes_reusing(&self, buf: &mut Vec<u8>) -> Result<()> {
        if buf.capacity() > REUSE_MAX {
            *buf = Vec::new();
        }
        self.recv_into_vec_locked(buf).map(drop)
    }

    /// Receives one message into `buf` (replacing what it held, reusing its memory).
    fn recv_into_vec_locked(
        &self,
        buf: &mut Vec<u8>,
    ) -> Result<(MutexGuard<'_, Reader>, VecDeque<OwnedFd>)> {
        self.recv_locked(self.max_message, false, buf)
    }

    /// Reads one frame of at most `limit` bytes into `buf` (replacing what it held,
    /// reusing its memory). Returns the descriptors that came with this frame, and only
    /// those, with the reader still locked (for callers that tidy its buffer).
    fn recv_locked(
        &self,
        limit: u64,
        nowait: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(MutexGuard<'_, Reader>, VecDeque<OwnedFd>)> {
        self.check_readable()?;
        let mut r = self.lock_reader();
        if let Some(why) = &r.broken {
            return Err(Error::protocol(format!("connection is unreadable: {why}")));
        }
        buf.clear();
        let start = r.offset();
        let res = self
            .read_header(&mut r, limit, nowait)
            .and_then(|len| self.read_payload_to(&mut r, len, nowait, buf));
        match res {
            Ok(()) => {
                let fds = r.frame_fds(start);
                Ok((r, fds))
            }
            Err(e) => {
                note_error(&mut r, &e);
                Err(e)
            }
        }
    }

    /// Reads a payload of `len` bytes into `out`, which must be empty.
    fn read_payload_to(
        &self,
        r: &mut Reader,
        len: usize,
        nowait: bool,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let take = len.min(r.end - r.start);
        let huge = len - take >= HUGE_PAGE_THRESHOLD;
        // Room for what has arrived and one step more, never the declared length up
        // front: it grows as the bytes come (below).
        reserve_payload(out, len, take, huge)?;
        out.extend_from_slice(&r.buf[r.start..r.start + take]);
        r.start += take;
        if out.len() < len {
            let left = len - out.len();
            if left >= READ_BUF / 2 {
                // Large payload: read straight into the destination's spare capacity
                // (never zero-filled first), grown as it fills.
                while out.len() < len {
                    if out.len() == out.capacity() {
                        reserve_payload(out, len, 0, huge)?;
                    }
                    let mut got = Vec::new();
                    let want = len - out.len();
                    let n = socket::recvmsg_append(self.fd.as_fd(), out, want, &mut got, nowait)
                        .map_err(|e| {
                            if e.kind() == io::ErrorKind::WouldBlock {
                                truncated()
                            } else {
                                Error::Io(e)
                            }
                        })?;
                    self.arrived(r, n, got);
                    if n == 0 {
                        return Err(truncated());
                    }
                }
            } else {
                // Less than a step is left: the room reserved above holds it.
                while out.len() < len {
                    if r.start == r.end {
                        let n = self.fill(r, nowait).map_err(|e| match e {
                            Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock => truncated(),
                            e => e,
                        })?;
                        if n == 0 {
                            return Err(truncated());
                        }
                    }
                    let take = (len - out.len()).min(r.end - r.start);
                    out.extend_from_slice(&r.buf[r.start..r.start + take]);
                    r.start += take;
                }
            }
        }
        Ok(())
    }
}

/// How far a payload's buffer may get ahead of the bytes that arrived: it starts at what
/// is buffered plus this, and grows fourfold as it fills. Payloads up to this size are
/// read into one allocation of exactly their length.
const PAYLOAD_STEP: usize = 4 << 20;

/// Makes `out` (holding the first `out.len()` bytes of a `len`-byte payload) able to hold
/// at least `at_least` bytes, and one growth step more: four times what has arrived, or
/// [`PAYLOAD_STEP`] more, whichever is larger, never beyond `len`. A peer that declares a
/// huge frame and sends little thus makes us allocate little (at most four times what it
/// sent, plus a step), and a 64 MiB payload takes three allocations.
///
/// For a `huge` payload the new buffer is advised onto huge pages before the bytes that
/// arrived are copied into it (rather than `realloc`, which would move them onto small
/// pages or split huge ones).
fn reserve_payload(out: &mut Vec<u8>, len: usize, at_least: usize, huge: bool) -> Result<()> {
    let have = out.len();
    let target = have
        .saturating_mul(4)
        .max(have.saturating_add(PAYLOAD_STEP))
        .max(at_least)
        .min(len);
    if target <= out.capacity() {
        return Ok(());
    }
    let no_room = |_| Error::protocol(format!("cannot allocate a message of {len} bytes"));
    if huge {
        let mut bigger = Vec::new();
        bigger.try_reserve_exact(target).map_err(no_room)?;
        socket::advise_huge_pages(&mut bigger);
        bigger.extend_from_slice(out);
        *out = bigger;
    } else {
        out.try_reserve_exact(target - have).map_err(no_room)?;
    }
    Ok(())
}

/// Marks the stream unreadable after an error that left it out of step (anything but a
/// clean end of stream, a message delivered whole, or nothing to read yet).
fn note_error(r: &mut Reader, e: &Error) {
    let at_boundary = matches!(e, Error::Eof | Error::BufferTooShort(_))
        || (r.start == r.end
            && matches!(e, Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
            && r.broken.is_none());
    if !at_boundary && r.broken.is_none() {
        r.broken = Some(e.to_string());
    }
}

fn truncated() -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "got end of file during message",
    ))
}

/// Wraps a connected Unix stream socket, e.g. one end of `UnixStream::pair()` or a
/// socket handed over by another program (no handshake is run).
impl From<std::os::unix::net::UnixStream> for Connection {
    fn from(s: std::os::unix::net::UnixStream) -> Connection {
        Connection::from_fd(s.into(), true, true)
    }
}

/// Wraps a connected TCP stream (no handshake is run; see [`Client`] for that).
impl From<std::net::TcpStream> for Connection {
    fn from(s: std::net::TcpStream) -> Connection {
        let _ = s.set_nodelay(true);
        Connection::from_fd(s.into(), true, true)
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("fd", &self.fd.as_raw_fd())
            .field("readable", &self.readable)
            .field("writable", &self.writable)
            .finish()
    }
}

#[derive(Serialize)]
struct WireRef<'a> {
    #[serde(serialize_with = "reduction::fd::serialize")]
    fd: &'a OwnedFd,
    readable: bool,
    writable: bool,
    max_message: u64,
    carries_fds: bool,
}

#[derive(Deserialize)]
struct WireOwned {
    #[serde(deserialize_with = "reduction::fd::deserialize")]
    fd: OwnedFd,
    readable: bool,
    writable: bool,
    max_message: u64,
    carries_fds: bool,
}

/// A connection travels to another process (in `Process` args, or through another
/// connection) as its descriptor. It cannot travel while it holds received bytes that
/// were not read yet: those would be lost, so that is an error.
impl Serialize for Connection {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        {
            let r = self.lock_reader();
            if r.start != r.end || !r.fds.is_empty() {
                return Err(serde::ser::Error::custom(
                    "this connection has received data that was not read yet; read it before sending the connection",
                ));
            }
        }
        WireRef {
            fd: &self.fd,
            readable: self.readable,
            writable: self.writable,
            max_message: self.max_message,
            carries_fds: self.carries_fds,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Connection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let w = WireOwned::deserialize(d)?;
        // A connection that refuses descriptors goes on refusing them in its new process.
        let mut c = Connection::from_fd(w.fd, w.readable, w.writable);
        c.carries_fds = w.carries_fds;
        c.max_message = w.max_message;
        Ok(c)
    }
}
