//! The async forms of `send` and `recv`: they wait in the crate's reactor for the socket,
//! so the thread that polls them never blocks on it.
//!
//! Dropping a future loses no message and never leaves the stream out of step:
//! * a receiving future reads into the connection's read-ahead buffer, and takes a
//!   message only once the whole frame is there: a dropped future leaves the part that
//!   arrived for the next `recv` (async or not);
//! * a sending future that could write only part of its frame hands the rest to the
//!   connection, which writes it before the next message (any `send`), or when it is
//!   dropped. The peer always sees whole frames, in order.

use super::framing::{parse_header, Header, Parsed};
use super::{Connection, Reader, READ_BUF};
use crate::error::{Error, Result};
use crate::reduction;
use crate::sys::reactor::{FdWatch, Ready};
use crate::sys::socket::{self, MAX_FDS_PER_MSG};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::task::{Context, Poll};

/// A read-ahead buffer grown for a large frame is let go once it is empty again.
const KEEP_BUF: usize = 4 * READ_BUF;

impl Connection {
    /// Receives a value sent with [`send`](Self::send), waiting without blocking the
    /// thread that polls the future: [`recv`](Self::recv) for async code, under any
    /// runtime. Dropping the future before it is ready loses no message.
    ///
    /// ```
    /// let (a, b) = multiprocess::pipe()?;
    /// a.send(&(1, "one".to_string()))?;
    /// let got: (i32, String) = futures::executor::block_on(b.recv_async())?;
    /// assert_eq!(got, (1, "one".to_string()));
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`recv`](Self::recv): [`Error::Eof`] once the peer has closed, a protocol or
    /// serialization error, an OS error.
    pub async fn recv_async<T: DeserializeOwned>(&self) -> Result<T> {
        self.frame_ready().await?;
        let mut msg = Vec::new();
        let (mut r, mut fds) = self.recv_locked(self.max_message, true, &mut msg)?;
        shrink(&mut r);
        drop(r);
        reduction::decode(&msg, &mut fds)
    }

    /// Receives one message's bytes, waiting without blocking the polling thread:
    /// [`recv_bytes`](Self::recv_bytes) for async code.
    ///
    /// ```
    /// let (a, b) = multiprocess::pipe()?;
    /// a.send_bytes(b"ping")?;
    /// assert_eq!(futures::executor::block_on(b.recv_bytes_async())?, b"ping");
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`recv_bytes`](Self::recv_bytes).
    pub async fn recv_bytes_async(&self) -> Result<Vec<u8>> {
        self.frame_ready().await?;
        let mut msg = Vec::new();
        let (mut r, _fds) = self.recv_locked(self.max_message, true, &mut msg)?;
        shrink(&mut r);
        Ok(msg)
    }

    /// Sends a value, waiting for room in the socket without blocking the polling thread:
    /// [`send`](Self::send) for async code. When it returns, the message is written (or,
    /// for a message larger than the socket's buffer, handed over in full to the
    /// connection, which writes the rest before anything else).
    ///
    /// ```
    /// let (a, b) = multiprocess::pipe()?;
    /// futures::executor::block_on(a.send_async(&vec![1u32, 2, 3]))?;
    /// assert_eq!(b.recv::<Vec<u32>>()?, [1, 2, 3]);
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`send`](Self::send): a value that cannot be encoded, a read-only connection,
    /// an OS error (a closed peer is `BrokenPipe`).
    pub async fn send_async<T: Serialize + ?Sized>(&self, value: &T) -> Result<()> {
        let enc = reduction::encode(value)?;
        if !self.writable || enc.fds.len() > MAX_FDS_PER_MSG {
            // Read-only: the error of `send`. Many descriptors: one frame in several
            // `sendmsg` calls, left to the blocking path (rare, and short).
            return self.send_frame(&enc.bytes, &enc.fds);
        }
        let header = Header::for_len(enc.bytes.len() as u64);
        let mut watch = FdWatch::new();
        let mut started = false;
        poll_fn(|cx| {
            let mut rest = self.lock_writer();
            if !rest.is_empty() && !flush(self, &mut rest)? {
                return self.arm_write(&mut watch, cx);
            }
            if started {
                // Our frame was the rest just written.
                return Poll::Ready(Ok(()));
            }
            let head = header.as_bytes();
            let total = head.len() + enc.bytes.len();
            let iov = [IoSlice::new(head), IoSlice::new(&enc.bytes)];
            let n = match socket::sendmsg(self.fd.as_fd(), &iov, &enc.fds, true) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.arm_write(&mut watch, cx);
                }
                Err(e) => return Poll::Ready(Err(Error::Io(e))),
            };
            if n < total {
                // Begun: the rest belongs to the connection from now on.
                started = true;
                if n < head.len() {
                    rest.extend_from_slice(&head[n..]);
                    rest.extend_from_slice(&enc.bytes);
                } else {
                    rest.extend_from_slice(&enc.bytes[n - head.len()..]);
                }
                if !flush(self, &mut rest)? {
                    return self.arm_write(&mut watch, cx);
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    fn arm_write(&self, watch: &mut FdWatch, cx: &mut Context<'_>) -> Poll<Result<()>> {
        match watch.arm(self.fd.as_fd(), Ready::Write, cx.waker()) {
            Ok(()) => Poll::Pending,
            Err(e) => Poll::Ready(Err(Error::Io(e))),
        }
    }

    /// The rest of a frame that a sending future began: written before any other frame.
    pub(super) fn lock_writer(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a whole frame is in the read-ahead buffer (or the stream ended, or
    /// holds something the blocking path reports as an error).
    async fn frame_ready(&self) -> Result<()> {
        self.check_readable()?;
        let mut watch = FdWatch::new();
        poll_fn(|cx| {
            let mut r = self.lock_reader();
            loop {
                if r.broken.is_some() {
                    return Poll::Ready(Ok(()));
                }
                let have = r.end - r.start;
                let need = match parse_header(r.buffered()) {
                    Parsed::NeedMore(n) => n,
                    Parsed::Frame { header_len, len } => {
                        if len > self.max_message {
                            return Poll::Ready(Ok(()));
                        }
                        match usize::try_from(len)
                            .ok()
                            .and_then(|l| l.checked_add(header_len))
                        {
                            Some(n) => n,
                            None => return Poll::Ready(Ok(())),
                        }
                    }
                    Parsed::Invalid(_) => return Poll::Ready(Ok(())),
                };
                if have >= need {
                    return Poll::Ready(Ok(()));
                }
                make_room(&mut r, need)?;
                let mut fds = Vec::new();
                let spare = r.buf.capacity() - r.buf.len();
                match socket::recvmsg_append(self.fd.as_fd(), &mut r.buf, spare, &mut fds, true) {
                    // The end of the stream: the blocking path says Eof or truncated.
                    Ok(0) => return Poll::Ready(Ok(())),
                    Ok(n) => {
                        r.end += n;
                        self.arrived(&mut r, n, fds);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drop(r);
                        watch.arm(self.fd.as_fd(), Ready::Read, cx.waker())?;
                        return Poll::Pending;
                    }
                    Err(e) => return Poll::Ready(Err(Error::Io(e))),
                }
            }
        })
        .await
    }
}

/// Writes what it can of `rest` without waiting; `true` once it is all written.
fn flush(c: &Connection, rest: &mut Vec<u8>) -> Result<bool> {
    while !rest.is_empty() {
        match socket::sendmsg(c.fd.as_fd(), &[IoSlice::new(rest)], &[], true) {
            Ok(n) => {
                rest.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => {
                // The peer is gone: nothing of this frame can arrive any more.
                rest.clear();
                return Err(Error::Io(e));
            }
        }
    }
    *rest = Vec::new();
    Ok(true)
}

/// Writes the rest of a frame begun by a sending future, waiting as `send` does. Called
/// by every blocking send before its own frame, and when the connection is dropped.
pub(super) fn flush_blocking(c: &Connection, rest: &mut Vec<u8>) -> Result<()> {
    while !rest.is_empty() {
        let n = socket::sendmsg(c.fd.as_fd(), &[IoSlice::new(rest)], &[], false);
        match n {
            Ok(n) => {
                rest.drain(..n);
            }
            Err(e) => {
                rest.clear();
                return Err(Error::Io(e));
            }
        }
    }
    Ok(())
}

/// Makes the read-ahead buffer able to hold `need` bytes from `start`, growing it by at
/// most what has arrived so far (plus one read's worth): a peer that announces a huge
/// frame and sends little gets little memory.
fn make_room(r: &mut Reader, need: usize) -> Result<()> {
    r.make_room(need);
    let cap = r.buf.capacity() - r.start;
    if cap < need || r.buf.len() == r.buf.capacity() {
        let have = r.end - r.start;
        let grow = (need - have.min(need)).min(have.max(READ_BUF)).max(1);
        r.buf
            .try_reserve(grow)
            .map_err(|_| Error::protocol(format!("cannot allocate a message of {need} bytes")))?;
    }
    Ok(())
}

/// Lets go of a read-ahead buffer that a large frame grew, once it is empty.
fn shrink(r: &mut Reader) {
    if r.start == r.end && r.buf.capacity() > KEEP_BUF {
        r.buf = Vec::new();
        r.start = 0;
        r.end = 0;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let rest = self.writer.get_mut().unwrap_or_else(|p| p.into_inner());
        if !rest.is_empty() {
            let mut rest = std::mem::take(rest);
            let _ = flush_blocking(self, &mut rest);
        }
    }
}
