//! [`Listener`] and [`Client`]: connections between unrelated processes over TCP or Unix
//! sockets, authenticated with an [`AuthKey`], wire-compatible with CPython's
//! `multiprocessing.connection.Listener` and `Client`.
//!
//! ```
//! use multiprocess::connection::{AuthKey, Client, Listener};
//!
//! let listener = Listener::bind("127.0.0.1:0", Some(AuthKey::from("secret")))?;
//! let address = listener.address().clone();
//! let server = std::thread::spawn(move || -> multiprocess::Result<()> {
//!     let conn = listener.accept()?;
//!     let msg = conn.recv_bytes()?;
//!     conn.send_bytes(&msg)
//! });
//! let conn = Client::new(address).authkey("secret").connect()?;
//! conn.send_bytes(b"ping")?;
//! assert_eq!(conn.recv_bytes()?, b"ping");
//! server.join().unwrap()?;
//! # Ok::<(), multiprocess::Error>(())
//! ```

use super::auth::{self, AuthPolicy, Transport};
use super::framing::{parse_header, Header, Parsed};
use super::Connection;
use crate::error::{Error, Result};
use crate::sys::fd::poll_readable;
use crate::sys::socket;
use std::fmt;
use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{self as unix, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a handshake may take before the connection is dropped (by default).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest message a connection made by [`Listener`] or [`Client`] accepts by
/// default (256 MiB); change it with the builders' `max_message_size`.
pub const DEFAULT_MAX_MESSAGE: u64 = 256 << 20;

/// Where a [`Listener`] listens or a [`Client`] connects.
///
/// Parsed from a string: `"host:port"` (or `"[v6]:port"`) is TCP, a string starting with
/// a NUL byte (`"\0name"`) is a Linux abstract Unix socket name, anything else is a Unix
/// socket path.
///
/// ```
/// use multiprocess::connection::Address;
/// assert_eq!("127.0.0.1:6000".parse::<Address>()?, Address::Inet { host: "127.0.0.1".into(), port: 6000 });
/// assert_eq!("/tmp/sock".parse::<Address>()?, Address::Unix("/tmp/sock".into()));
/// assert_eq!("\0name".parse::<Address>()?, Address::Abstract(b"name".to_vec()));
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// TCP (Python's `'AF_INET'`): a host name or IP address and a port.
    Inet {
        /// Host name or IP address.
        host: String,
        /// Port; 0 asks for any free port when binding.
        port: u16,
    },
    /// A Unix socket path in the file system (`'AF_UNIX'`).
    Unix(PathBuf),
    /// A Linux abstract Unix socket name, without the leading NUL.
    Abstract(Vec<u8>),
}

impl FromStr for Address {
    type Err = Error;

    fn from_str(s: &str) -> Result<Address> {
        if let Some(name) = s.strip_prefix('\0') {
            return Ok(Address::Abstract(name.as_bytes().to_vec()));
        }
        if !s.contains('/') {
            if let Some((host, port)) = s.rsplit_once(':') {
                if let Ok(port) = port.parse::<u16>() {
                    let host = host
                        .strip_prefix('[')
                        .and_then(|h| h.strip_suffix(']'))
                        .unwrap_or(host);
                    return Ok(Address::Inet {
                        host: host.to_string(),
                        port,
                    });
                }
            }
        }
        if s.is_empty() {
            return Err(invalid("an empty address"));
        }
        Ok(Address::Unix(PathBuf::from(s)))
    }
}

impl fmt::Display for Address {
    /// `host:port` (`[v6]:port`), the path, or `@name` for an abstract name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Inet { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Abstract(n) => write!(f, "@{}", String::from_utf8_lossy(n)),
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Address {
        Address::Inet {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl From<PathBuf> for Address {
    fn from(p: PathBuf) -> Address {
        Address::Unix(p)
    }
}

impl From<&Path> for Address {
    fn from(p: &Path) -> Address {
        Address::Unix(p.to_path_buf())
    }
}

/// Anything that names an [`Address`]: an `Address`, a `&str`/`String` (parsed), a
/// `SocketAddr`, a `Path`.
pub trait ToAddress {
    /// The address, or an error if the string does not parse.
    fn to_address(&self) -> Result<Address>;
}

impl ToAddress for Address {
    fn to_address(&self) -> Result<Address> {
        Ok(self.clone())
    }
}
impl ToAddress for &Address {
    fn to_address(&self) -> Result<Address> {
        Ok((*self).clone())
    }
}
impl ToAddress for &str {
    fn to_address(&self) -> Result<Address> {
        self.parse()
    }
}
impl ToAddress for String {
    fn to_address(&self) -> Result<Address> {
        self.parse()
    }
}
impl ToAddress for SocketAddr {
    fn to_address(&self) -> Result<Address> {
        Ok((*self).into())
    }
}
impl ToAddress for &Path {
    fn to_address(&self) -> Result<Address> {
        Ok((*self).into())
    }
}
impl ToAddress for PathBuf {
    fn to_address(&self) -> Result<Address> {
        Ok(self.clone().into())
    }
}

/// A shared secret for the handshake. Any bytes, including none: an empty key is still a
/// key and the handshake runs (as in CPython 3.13). No key (`None`) means no handshake.
///
/// ```
/// use multiprocess::connection::AuthKey;
/// let k = AuthKey::from("secret");
/// assert_eq!(k.as_bytes(), b"secret");
/// assert_eq!(format!("{k:?}"), "AuthKey(<6 bytes>)");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey(Vec<u8>);

impl AuthKey {
    /// A key made of these bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> AuthKey {
        AuthKey(bytes.into())
    }

    /// 32 random bytes from the operating system (what Python gives a main process).
    pub fn random() -> Result<AuthKey> {
        let mut k = vec![0u8; 32];
        auth::os_random(&mut k)?;
        Ok(AuthKey(k))
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthKey(<{} bytes>)", self.0.len())
    }
}

impl From<&str> for AuthKey {
    fn from(s: &str) -> AuthKey {
        AuthKey(s.as_bytes().to_vec())
    }
}
impl From<String> for AuthKey {
    fn from(s: String) -> AuthKey {
        AuthKey(s.into_bytes())
    }
}
impl From<&[u8]> for AuthKey {
    fn from(s: &[u8]) -> AuthKey {
        AuthKey(s.to_vec())
    }
}
impl<const N: usize> From<&[u8; N]> for AuthKey {
    fn from(s: &[u8; N]) -> AuthKey {
        AuthKey(s.to_vec())
    }
}
impl From<Vec<u8>> for AuthKey {
    fn from(s: Vec<u8>) -> AuthKey {
        AuthKey(s)
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Io(io::Error::new(io::ErrorKind::InvalidInput, msg.into()))
}

/// Settings shared by listeners and clients.
#[derive(Debug, Clone)]
struct Settings {
    authkey: Option<AuthKey>,
    handshake_timeout: Duration,
    max_message: Option<u64>,
    policy: AuthPolicy,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            authkey: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_message: Some(DEFAULT_MAX_MESSAGE),
            policy: AuthPolicy::default(),
        }
    }
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Accepts connections (Python's `multiprocessing.connection.Listener`).
///
/// With an [`AuthKey`], every accepted connection must pass the handshake (challenger,
/// then responder) within the handshake timeout before [`accept`](Self::accept) returns
/// it; a peer that fails is dropped and `accept` reports the failure, leaving the
/// listener usable. A Unix socket file created by the listener is removed when it is
/// dropped.
pub struct Listener {
    socket: Socket,
    address: Address,
    settings: Settings,
    unlink: Option<PathBuf>,
    last_accepted: Mutex<Option<Address>>,
}

/// Configures and binds a [`Listener`].
#[derive(Debug)]
#[must_use]
pub struct ListenerBuilder {
    address: Result<Address>,
    settings: Settings,
    allow_remote_without_key: bool,
}

impl ListenerBuilder {
    /// The key peers must prove they know (no key: no handshake).
    pub fn authkey(mut self, key: impl Into<AuthKey>) -> Self {
        self.settings.authkey = Some(key.into());
        self
    }

    /// Sets or clears the key.
    pub fn authkey_opt(mut self, key: Option<AuthKey>) -> Self {
        self.settings.authkey = key;
        self
    }

    /// How long a peer may take to finish the handshake (default 20 s).
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.settings.handshake_timeout = d;
        self
    }

    /// The largest message accepted connections receive ([`DEFAULT_MAX_MESSAGE`] by
    /// default); `None` for no limit (CPython's behaviour).
    pub fn max_message_size(mut self, max: Option<u64>) -> Self {
        self.settings.max_message = max;
        self
    }

    /// Whether to accept HMAC-MD5 responses (CPython 3.11 and older peers). On by default.
    pub fn accept_md5(mut self, yes: bool) -> Self {
        self.settings.policy.accept_md5 = yes;
        self
    }

    /// Allows binding a TCP address that is not loopback without a key. Anyone who can
    /// reach the port can then send you messages; refused unless you opt in here.
    pub fn allow_remote_without_authkey(mut self, yes: bool) -> Self {
        self.allow_remote_without_key = yes;
        self
    }

    /// Binds and listens.
    pub fn bind(self) -> Result<Listener> {
        let address = self.address?;
        let (socket, address, unlink) = match &address {
            Address::Inet { host, port } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), *port).to_socket_addrs()?.collect();
                if addrs.is_empty() {
                    return Err(invalid(format!("{address} resolves to no address")));
                }
                if self.settings.authkey.is_none()
                    && !self.allow_remote_without_key
                    && addrs.iter().any(|a| !a.ip().is_loopback())
                {
                    return Err(invalid(format!(
                        "refusing to listen on non-loopback address {address} without an authkey \
                         (anyone who can reach it could send messages); set an authkey, or \
                         call allow_remote_without_authkey(true)"
                    )));
                }
                let l = TcpListener::bind(&addrs[..])?;
                let bound = l.local_addr()?.into();
                (Socket::Tcp(l), bound, None)
            }
            Address::Unix(p) => {
                let l = UnixListener::bind(p)?;
                (Socket::Unix(l), address.clone(), Some(p.clone()))
            }
            Address::Abstract(name) => {
                let a = unix::SocketAddr::from_abstract_name(name)?;
                let l = UnixListener::bind_addr(&a)?;
                (Socket::Unix(l), address.clone(), None)
            }
        };
        Ok(Listener {
            socket,
            address,
            settings: self.settings,
            unlink,
            last_accepted: Mutex::new(None),
        })
    }
}

impl Listener {
    /// Binds `address` with the given key (Python's `Listener(address, authkey=...)`).
    /// A TCP address that is not loopback needs a key (see
    /// [`ListenerBuilder::allow_remote_without_authkey`]).
    pub fn bind(address: impl ToAddress, authkey: Option<AuthKey>) -> Result<Listener> {
        Listener::builder(address).authkey_opt(authkey).bind()
    }

    /// A builder for more settings (handshake timeout, maximum message size, MD5 policy).
    ///
    /// ```
    /// use multiprocess::connection::Listener;
    /// use std::time::Duration;
    /// let l = Listener::builder("\0multiprocess-doc-listener")
    ///     .authkey("k")
    ///     .handshake_timeout(Duration::from_secs(5))
    ///     .max_message_size(Some(1 << 20))
    ///     .bind()?;
    /// assert_eq!(l.address().to_string(), "@multiprocess-doc-listener");
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    pub fn builder(address: impl ToAddress) -> ListenerBuilder {
        ListenerBuilder {
            address: address.to_address(),
            settings: Settings::default(),
            allow_remote_without_key: false,
        }
    }

    /// The address it listens on (for TCP, with the real port when 0 was asked for).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The address of the last peer that [`accept`](Self::accept) returned.
    pub fn last_accepted(&self) -> Option<Address> {
        self.last_accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for a peer and, with a key, authenticates it. A failed or timed-out
    /// handshake drops that connection and returns the error
    /// ([`Error::Authentication`], [`Error::Timeout`]…); the listener stays usable.
    pub fn accept(&self) -> Result<Connection> {
        let (fd, peer): (OwnedFd, Address) = match &self.socket {
            Socket::Tcp(l) => {
                let (s, a) = l.accept()?;
                s.set_nodelay(true)?;
                (s.into(), a.into())
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
                (s.into(), peer)
            }
        };
        let conn = finish(fd, &self.settings, Role::Listener)?;
        *self.last_accepted.lock().unwrap_or_else(|p| p.into_inner()) = Some(peer);
        Ok(conn)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = &self.unlink {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("address", &self.address)
            .field("authenticated", &self.settings.authkey.is_some())
            .finish()
    }
}

/// Connects to a [`Listener`] (or a CPython `multiprocessing.connection.Listener`):
/// Python's `Client(address, authkey=...)`, as a builder.
///
/// ```no_run
/// use multiprocess::connection::Client;
/// let conn = Client::new("127.0.0.1:6000").authkey("secret").connect()?;
/// conn.send_bytes(b"hello")?;
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[derive(Debug)]
#[must_use]
pub struct Client {
    address: Result<Address>,
    settings: Settings,
    connect_timeout: Option<Duration>,
}

impl Client {
    /// A client for `address`, with no key (no handshake) until [`authkey`](Self::authkey).
    pub fn new(address: impl ToAddress) -> Client {
        Client {
            address: address.to_address(),
            settings: Settings::default(),
            connect_timeout: None,
        }
    }

    /// The key to prove and to demand from the listener.
    pub fn authkey(mut self, key: impl Into<AuthKey>) -> Self {
        self.settings.authkey = Some(key.into());
        self
    }

    /// Sets or clears the key.
    pub fn authkey_opt(mut self, key: Option<AuthKey>) -> Self {
        self.settings.authkey = key;
        self
    }

    /// How long the listener may take to finish the handshake (default 20 s).
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.settings.handshake_timeout = d;
        self
    }

    /// How long the TCP connect may take (default: the system's).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = Some(d);
        self
    }

    /// The largest message the connection receives ([`DEFAULT_MAX_MESSAGE`] by default);
    /// `None` for no limit.
    pub fn max_message_size(mut self, max: Option<u64>) -> Self {
        self.settings.max_message = max;
        self
    }

    /// Whether to accept HMAC-MD5 responses from the listener. On by default.
    pub fn accept_md5(mut self, yes: bool) -> Self {
        self.settings.policy.accept_md5 = yes;
        self
    }

    /// Connects and, with a key, runs the handshake (responder, then challenger).
    pub fn connect(self) -> Result<Connection> {
        let address = self.address?;
        let fd: OwnedFd = match &address {
            Address::Inet { host, port } => {
                let s = match self.connect_timeout {
                    None => TcpStream::connect((host.as_str(), *port))?,
                    Some(t) => {
                        let mut last = None;
                        let mut found = None;
                        for a in (host.as_str(), *port).to_socket_addrs()? {
                            match TcpStream::connect_timeout(&a, t) {
                                Ok(s) => {
                                    found = Some(s);
                                    break;
                                }
                                Err(e) => last = Some(e),
                            }
                        }
                        match found {
                            Some(s) => s,
                            None => {
                                return Err(last
                                    .map(Error::Io)
                                    .unwrap_or_else(|| invalid("address resolves to nothing")))
                            }
                        }
                    }
                };
                s.set_nodelay(true)?;
                s.into()
            }
            Address::Unix(p) => UnixStream::connect(p)?.into(),
            Address::Abstract(name) => {
                UnixStream::connect_addr(&unix::SocketAddr::from_abstract_name(name)?)?.into()
            }
        };
        finish(fd, &self.settings, Role::Client)
    }
}

#[derive(Clone, Copy)]
enum Role {
    Listener,
    Client,
}

/// Runs the handshake (if keyed) on a fresh socket and wraps it.
fn finish(fd: OwnedFd, settings: &Settings, role: Role) -> Result<Connection> {
    if let Some(key) = &settings.authkey {
        let mut t = TimedSocket {
            fd: fd.as_fd(),
            deadline: Instant::now() + settings.handshake_timeout,
        };
        let key = key.as_bytes();
        match role {
            Role::Listener => {
                auth::deliver_challenge(&mut t, key, &settings.policy)?;
                auth::answer_challenge(&mut t, key)?;
            }
            Role::Client => {
                auth::answer_challenge(&mut t, key)?;
                auth::deliver_challenge(&mut t, key, &settings.policy)?;
            }
        }
    }
    let mut conn = Connection::from_fd(fd, true, true);
    conn.set_max_message_size(settings.max_message);
    Ok(conn)
}

/// The handshake's transport: reads exactly one frame at a time straight from the
/// socket (never past it, so application data that follows stays for the
/// [`Connection`]), with an overall deadline.
struct TimedSocket<'a> {
    fd: BorrowedFd<'a>,
    deadline: Instant,
}

impl TimedSocket<'_> {
    fn read_exact(&mut self, buf: &mut [u8], frame_started: bool) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !poll_readable(&[self.fd], Some(left))?[0].readable {
                return Err(Error::timeout());
            }
            let mut fds = Vec::new();
            match socket::recvmsg(self.fd, &mut buf[filled..], &mut fds, true) {
                Ok(0) if filled == 0 && !frame_started => return Err(Error::Eof),
                Ok(0) => {
                    return Err(Error::protocol(
                        "got end of file during a handshake message",
                    ))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl Transport for TimedSocket<'_> {
    fn send_message(&mut self, msg: &[u8]) -> Result<()> {
        let header = Header::for_len(msg.len() as u64);
        let whole = [header.as_bytes(), msg].concat();
        let mut sent = 0;
        while sent < whole.len() {
            sent += socket::sendmsg(self.fd, &[IoSlice::new(&whole[sent..])], &[], false)?;
        }
        Ok(())
    }

    fn recv_message(&mut self, limit: usize) -> Result<Vec<u8>> {
        let mut head = [0u8; 12];
        self.read_exact(&mut head[..4], false)?;
        let len = match parse_header(&head[..4]) {
            Parsed::Frame { len, .. } => len,
            Parsed::NeedMore(_) => {
                self.read_exact(&mut head[4..12], true)?;
                match parse_header(&head) {
                    Parsed::Frame { len, .. } => len,
                    _ => return Err(Error::protocol("bad message header")),
                }
            }
            Parsed::Invalid(n) => {
                return Err(Error::protocol(format!("invalid message length {n}")))
            }
        };
        if len > limit as u64 {
            return Err(Error::protocol(format!(
                "bad message length: {len} bytes in the handshake (limit {limit})"
            )));
        }
        let mut msg = vec![0u8; len as usize];
        self.read_exact(&mut msg, true)?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        for (s, shown) in [
            ("localhost:80", "localhost:80"),
            ("[::1]:8080", "[::1]:8080"),
            ("/tmp/x:1", "/tmp/x:1"),
            ("rel.sock", "rel.sock"),
            ("\0abs", "@abs"),
        ] {
            assert_eq!(s.parse::<Address>().unwrap().to_string(), shown);
        }
        assert!("".parse::<Address>().is_err());
    }

    #[test]
    fn remote_bind_without_key_is_refused() {
        let e = Listener::bind("0.0.0.0:0", None).unwrap_err();
        assert!(e.to_string().contains("without an authkey"), "{e}");
        Listener::bind("0.0.0.0:0", Some("k".into())).unwrap();
        Listener::bind("127.0.0.1:0", None).unwrap();
    }

    #[test]
    fn wrong_key_then_right_key_on_the_same_listener() {
        let l = Listener::bind("127.0.0.1:0", Some("right".into())).unwrap();
        let addr = l.address().clone();
        let t = std::thread::spawn(move || {
            let bad = Client::new(&addr).authkey("wrong").connect().unwrap_err();
            let good = Client::new(&addr).authkey("right").connect().unwrap();
            good.send_bytes(b"hi").unwrap();
            bad
        });
        let e = l.accept().unwrap_err();
        assert!(
            matches!(&e, Error::Authentication(m) if m == "digest received was wrong"),
            "{e}"
        );
        let c = l.accept().unwrap();
        assert_eq!(c.recv_bytes().unwrap(), b"hi");
        let bad = t.join().unwrap();
        assert!(
            matches!(&bad, Error::Authentication(m) if m == "digest sent was rejected"),
            "{bad}"
        );
        assert!(matches!(l.last_accepted(), Some(Address::Inet { .. })));
    }

    #[test]
    fn silent_peer_times_out_and_listener_survives() {
        let dir = std::env::temp_dir().join(format!("mp-listener-{}", std::process::id()));
        let l = Listener::builder(dir.as_path())
            .authkey("k")
            .handshake_timeout(Duration::from_millis(200))
            .bind()
            .unwrap();
        let silent = UnixStream::connect(&dir).unwrap();
        let e = l.accept().unwrap_err();
        assert!(e.is_timeout(), "{e}");
        drop(silent);
        let addr = l.address().clone();
        let t = std::thread::spawn(move || Client::new(addr).authkey("k").connect().map(drop));
        l.accept().unwrap();
        t.join().unwrap().unwrap();
        drop(l);
        assert!(!dir.exists(), "socket file removed on drop");
    }

    #[test]
    fn oversized_handshake_message_is_refused() {
        let l = Listener::bind("\0mp-oversized-test", Some("k".into())).unwrap();
        let t = std::thread::spawn(|| {
            let s = UnixStream::connect_addr(
                &unix::SocketAddr::from_abstract_name(b"mp-oversized-test").unwrap(),
            )
            .unwrap();
            let c = Connection::from_fd(s.into(), true, true);
            let _challenge = c.recv_bytes().unwrap();
            c.send_bytes(&[0u8; 300]).unwrap();
            c
        });
        let e = l.accept().unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        drop(t.join().unwrap());
    }
}
