//! The handshakes of a keyed [`Listener`](super::Listener), off the accept path.
//!
//! One thread per listener accepts peers and runs every pending handshake at once, each
//! as a small state machine over a non-blocking socket, all watched by one `poll`. A
//! peer that completes the handshake is queued for [`Listener::accept`](super::Listener::accept);
//! a peer that fails it, or has not finished it by its deadline (every byte, both
//! directions), is closed. At most `max_handshakes` handshakes are in flight: a new peer
//! beyond that evicts the oldest pending one (so a flood of silent peers cannot lock out
//! a client that answers at once), and while `max_handshakes` authenticated connections
//! wait to be accepted, new peers stay in the kernel's backlog.

use super::auth::{self, AuthPolicy, FAILURE, MESSAGE_LIMIT, NONCE_LEN, WELCOME};
use super::framing::{parse_header, Header, Parsed};
use super::listener::{Address, AuthKey};
use super::Connection;
use crate::error::{Error, Result};
use crate::sys::fd::{eventfd, eventfd_drain, eventfd_signal, poll_readable};
use crate::sys::socket;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the acceptor stops taking new peers after `accept` fails for want of
/// resources (`EMFILE`, `ENFILE`, `ENOMEM`), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listening socket.
pub(super) enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Socket {
    /// Accepts one peer (blocking or not, as the socket is set).
    pub(super) fn accept(&self) -> io::Result<(OwnedFd, Address)> {
        match self {
            Socket::Tcp(l) => {
                let (s, a) = l.accept()?;
                s.set_nodelay(true)?;
                Ok((s.into(), a.into()))
            }
            Socket::Unix(l) => {
                let (s, a) = l.accept()?;
                let peer = if let Some(p) = a.as_pathname() {
                    Address::Unix(p.to_path_buf())
                } else if let Some(n) = a.as_abstract_name() {
                    Address::Abstract(n.to_vec())
                } else {
                    Address::Unix(PathBuf::new())
                };
                Ok((s.into(), peer))
            }
        }
    }

    pub(super) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(l) => l.set_nonblocking(true),
            Socket::Unix(l) => l.set_nonblocking(true),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Unix(l) => l.as_fd(),
        }
    }
}

/// What the acceptor needs to know.
pub(super) struct Limits {
    pub key: AuthKey,
    pub policy: AuthPolicy,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
    pub max_message: Option<u64>,
}

struct Queue {
    ready: VecDeque<(Connection, Address)>,
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    cond: Condvar,
    stop: AtomicBool,
    wake: OwnedFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The acceptor thread of one listener; stopped and joined on drop.
pub(super) struct Acceptor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Starts the thread, which owns `socket` from now on.
    pub(super) fn start(socket: Socket, limits: Limits) -> Result<Acceptor> {
        socket.set_nonblocking()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                ready: VecDeque::new(),
                stopped: false,
            }),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
            wake: eventfd()?,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mp-listener".into())
            .spawn(move || {
                let _stopped = MarkStopped(&s);
                run(&socket, &limits, &s);
            })?;
        Ok(Acceptor {
            shared,
            thread: Some(thread),
        })
    }

    /// The next authenticated connection, waiting until `deadline` (`None`: for ever).
    pub(super) fn next(&self, deadline: Option<Instant>) -> Result<(Connection, Address)> {
        let mut q = self.shared.lock();
        loop {
            if let Some(c) = q.ready.pop_front() {
                drop(q);
                // Room in the queue: the acceptor may take new peers again.
                eventfd_signal(self.shared.wake.as_fd());
                return Ok(c);
            }
            if q.stopped {
                return Err(Error::Io(io::Error::other(
                    "the listener's acceptor thread has stopped",
                )));
            }
            q = match deadline {
                None => self.shared.cond.wait(q).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::timeout());
                    }
                    self.shared
                        .cond
                        .wait_timeout(q, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

/// Stops an acceptor's thread from anywhere (see `Listener::interrupter`): peers no
/// longer get in, and [`Acceptor::next`] fails once the thread has ended.
#[derive(Clone)]
pub(super) struct Stopper(Arc<Shared>);

impl Stopper {
    pub(super) fn stop(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
        eventfd_signal(self.0.wake.as_fd());
    }
}

impl Acceptor {
    pub(super) fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stopper().stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Marks the queue stopped when the thread ends, however it ends.
struct MarkStopped<'a>(&'a Shared);

impl Drop for MarkStopped<'_> {
    fn drop(&mut self) {
        self.0.lock().stopped = true;
        self.0.cond.notify_all();
    }
}

fn run(socket: &Socket, limits: &Limits, shared: &Shared) {
    let mut pending: Vec<Pending> = Vec::new();
    let mut backoff: Option<Instant> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        // A handshake past its deadline is over: its socket is closed here.
        pending.retain(|p| p.deadline > now);
        if backoff.is_some_and(|b| b <= now) {
            backoff = None;
        }
        let queue_full = shared.lock().ready.len() >= limits.max_handshakes;
        let listen = backoff.is_none() && !queue_full;
        let mut fds = vec![shared.wake.as_fd()];
        if listen {
            fds.push(socket.as_fd());
        }
        fds.extend(pending.iter().map(|p| p.fd.as_fd()));
        let until = pending.iter().map(|p| p.deadline).chain(backoff).min();
        let timeout = until.map(|u| u.saturating_duration_since(now));
        let polled = match poll_readable(&fds, timeout) {
            Ok(p) => p,
            Err(_) => {
                // Only resource exhaustion gets here: wait a little and retry.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if polled[0].readable {
            eventfd_drain(shared.wake.as_fd());
        }
        let base = if listen { 2 } else { 1 };
        // From the end, so that swap_remove only moves entries already visited.
        for i in (0..pending.len()).rev() {
            if !polled[base + i].readable {
                continue;
            }
            match pending[i].advance(limits) {
                Progress::Waiting => {}
                Progress::Failed => drop(pending.swap_remove(i)),
                Progress::Done => {
                    let p = pending.swap_remove(i);
                    let mut conn = Connection::from_fd(p.fd, true, true);
                    conn.set_max_message_size(limits.max_message);
                    conn.refuse_descriptors();
                    shared.lock().ready.push_back((conn, p.peer));
                    shared.cond.notify_one();
                }
            }
        }
        if listen && polled[1].readable {
            // A bounded batch, so that pending handshakes are not starved.
            for _ in 0..limits.max_handshakes.max(1) {
                match socket.accept() {
                    Ok((fd, peer)) => {
                        if pending.len() >= limits.max_handshakes {
                            // Full: the peer that has waited longest makes room.
                            if let Some(oldest) =
                                (0..pending.len()).min_by_key(|&i| pending[i].deadline)
                            {
                                drop(pending.swap_remove(oldest));
                            }
                        }
                        if limits.max_handshakes == 0 {
                            continue;
                        }
                        let deadline = Instant::now() + limits.handshake_timeout;
                        if let Ok(p) = Pending::start(fd, peer, deadline) {
                            pending.push(p);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(_) => {
                        backoff = Some(Instant::now() + ACCEPT_BACKOFF);
                        break;
                    }
                }
            }
        }
    }
}

/// Where a listener's handshake stands (challenger first, then responder).
enum Stage {
    /// Challenge sent; waiting for the peer's HMAC of `body`.
    Response { body: Vec<u8> },
    /// Peer accepted; waiting for its challenge.
    Challenge,
    /// Our response sent; waiting for the peer's verdict.
    Verdict,
}

enum Progress {
    Waiting,
    Done,
    Failed,
}

/// One handshake in flight.
struct Pending {
    fd: OwnedFd,
    peer: Address,
    deadline: Instant,
    stage: Stage,
    /// Frame header bytes read so far.
    head: [u8; 12],
    head_got: usize,
    /// Payload length, once the header is complete, and the payload read so far.
    len: Option<usize>,
    msg: [u8; MESSAGE_LIMIT],
    msg_got: usize,
}

impl Pending {
    fn start(fd: OwnedFd, peer: Address, deadline: Instant) -> Result<Pending> {
        let mut nonce = [0u8; NONCE_LEN];
        auth::os_random(&mut nonce)?;
        let (body, challenge) = auth::challenge_message(&nonce);
        send(fd.as_fd(), &challenge)?;
        Ok(Pending {
            fd,
            peer,
            deadline,
            stage: Stage::Response { body },
            head: [0; 12],
            head_got: 0,
            len: None,
            msg: [0; MESSAGE_LIMIT],
            msg_got: 0,
        })
    }

    /// Reads what has arrived and answers every whole message.
    fn advance(&mut self, limits: &Limits) -> Progress {
        loop {
            match self.read_message() {
                Ok(Some(len)) => match self.answer(len, limits) {
                    Ok(true) => return Progress::Done,
                    Ok(false) => {}
                    Err(_) => return Progress::Failed,
                },
                Ok(None) => return Progress::Waiting,
                Err(_) => return Progress::Failed,
            }
        }
    }

    /// Reads, never past the end of the current frame (application data that follows
    /// the handshake stays in the socket for the connection); `Some(len)` once the frame
    /// is whole (its payload in `msg[..len]`), `None` when the socket has nothing more.
    fn read_message(&mut self) -> Result<Option<usize>> {
        loop {
            let len = match self.len {
                Some(len) => len,
                None => match parse_header(&self.head[..self.head_got]) {
                    Parsed::NeedMore(n) => {
                        let Some(got) = recv(self.fd.as_fd(), &mut self.head[self.head_got..n])?
                        else {
                            return Ok(None);
                        };
                        self.head_got += got;
                        continue;
                    }
                    Parsed::Frame { len, .. } if len <= MESSAGE_LIMIT as u64 => {
                        self.len = Some(len as usize);
                        len as usize
                    }
                    Parsed::Frame { len, .. } => {
                        return Err(Error::protocol(format!(
                        "bad message length: {len} bytes in the handshake (limit {MESSAGE_LIMIT})"
                    )))
                    }
                    Parsed::Invalid(n) => {
                        return Err(Error::protocol(format!("invalid message length {n}")))
                    }
                },
            };
            if self.msg_got == len {
                self.len = None;
                self.head_got = 0;
                self.msg_got = 0;
                return Ok(Some(len));
            }
            let Some(got) = recv(self.fd.as_fd(), &mut self.msg[self.msg_got..len])? else {
                return Ok(None);
            };
            self.msg_got += got;
        }
    }

    /// Answers a whole message; true when the handshake is complete.
    fn answer(&mut self, len: usize, limits: &Limits) -> Result<bool> {
        let msg = &self.msg[..len];
        let key = limits.key.as_bytes();
        match std::mem::replace(&mut self.stage, Stage::Verdict) {
            Stage::Response { body } => match auth::verify(key, &body, msg, &limits.policy) {
                Ok(()) => {
                    send(self.fd.as_fd(), WELCOME)?;
                    self.stage = Stage::Challenge;
                    Ok(false)
                }
                Err(why) => {
                    let _ = send(self.fd.as_fd(), FAILURE);
                    Err(Error::Authentication(why))
                }
            },
            Stage::Challenge => {
                let response = auth::response_to(key, msg)?;
                send(self.fd.as_fd(), &response)?;
                Ok(false)
            }
            Stage::Verdict => auth::check_verdict(msg).map(|()| true),
        }
    }
}

/// One non-blocking read; `None` when nothing has arrived. Descriptors a peer passes
/// during the handshake are closed at once.
fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<usize>> {
    let mut passed = Vec::new();
    match socket::recvmsg(fd, buf, &mut passed, true) {
        Ok(0) => Err(Error::Eof),
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Sends one handshake message without waiting. Every handshake message is under 300
/// bytes, far below any socket buffer, so a send that does not complete at once means a
/// peer that does not read: that fails the handshake rather than block anyone.
pub(super) fn send(fd: BorrowedFd<'_>, msg: &[u8]) -> Result<()> {
    let header = Header::for_len(msg.len() as u64);
    let total = header.as_bytes().len() + msg.len();
    let bufs = [IoSlice::new(header.as_bytes()), IoSlice::new(msg)];
    let sent = socket::sendmsg(fd, &bufs, &[], true)?;
    if sent == total {
        Ok(())
    } else {
        Err(Error::protocol(
            "the peer does not read its handshake messages",
        ))
    }
}
