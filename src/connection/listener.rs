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

use super::acceptor::{self, Acceptor, Limits, Socket};
use super::auth::{self, AuthPolicy, Transport};
use super::framing::{parse_header, Parsed};
use super::Connection;
use crate::error::{Error, Result};
use crate::sys::fd::{eventfd, eventfd_signal, poll_readable};
use crate::sys::socket;
use std::fmt;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{self as unix, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a peer has, by default, to complete the whole handshake (every byte, both
/// directions) before its socket is closed.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many handshakes a [`Listener`] runs at once by default; see
/// [`ListenerBuilder::max_handshakes`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 128;

/// The permissions a [`Listener`] gives the Unix socket file it creates, by default:
/// only its owner may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

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

/// Accepts connections (Python's `multiprocessing.connection.Listener`).
///
/// With an [`AuthKey`], [`accept`](Self::accept) returns only peers that have completed
/// the handshake (challenger, then responder). Handshakes never run on the accept path:
/// one thread per keyed listener runs every pending handshake at once, without blocking
/// on any peer, so a silent or slow peer costs nothing to the others. A peer that fails
/// the handshake, or has not finished it within the handshake timeout
/// ([`DEFAULT_HANDSHAKE_TIMEOUT`]), is closed; at most
/// [`max_handshakes`](ListenerBuilder::max_handshakes) run at once. Unlike CPython,
/// failed handshakes are not reported by `accept` (an attacker would otherwise decide
/// what `accept` returns); the failing peer sees the failure.
///
/// A Unix socket file is created with mode `0600` ([`DEFAULT_SOCKET_MODE`]) and removed
/// when the listener is dropped, if it is still the file the listener created.
/// Connections made by a listener refuse passed descriptors (`SCM_RIGHTS`): any that a
/// peer sends are closed on arrival.
pub struct Listener {
    incoming: Incoming,
    /// Set (and `wake` signalled) by an [`Interrupter`]: every `accept` fails from then.
    interrupted: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    address: Address,
    settings: Settings,
    /// Removed (if still ours) on drop, after `incoming` has closed the socket.
    _socket_file: Option<SocketFile>,
    last_accepted: Mutex<Option<Address>>,
}

/// Where accepted connections come from.
enum Incoming {
    /// No key: straight from the (non-blocking) listening socket.
    Direct(Socket),
    /// With a key: from the acceptor thread, handshake done.
    Handshaking(Acceptor),
}

/// The socket file a listener created, identified by device and inode so that a file
/// someone else put at the same path is never removed.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn new(path: &Path) -> Result<SocketFile> {
        let m = fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds a Unix socket at `path` whose file has exactly `mode`, with no moment at which
/// anyone else could connect under looser permissions: the socket is bound inside a
/// fresh private (0700) directory, given its mode, then linked to `path` (which fails,
/// as `bind` would, if `path` exists). Where that cannot be done (a path too long for
/// the detour, a file system without hard links), it binds at `path` and sets the mode
/// right after.
fn bind_unix(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut salt = [0u8; 8];
    auth::os_random(&mut salt)?;
    let private = dir.join(format!(".mp-{:016x}", u64::from_ne_bytes(salt)));
    let via_private = fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .and_then(|()| {
            let tmp = private.join("s");
            let linked = UnixListener::bind(&tmp).and_then(|l| {
                fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
                fs::hard_link(&tmp, path)?;
                Ok(l)
            });
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_dir(&private);
            linked
        });
    let l = match via_private {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} already exists", path.display()),
            )))
        }
        Err(_) => {
            let l = UnixListener::bind(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
            l
        }
    };
    let file = SocketFile::new(path)?;
    Ok((l, file))
}

/// Configures and binds a [`Listener`].
#[derive(Debug)]
#[must_use]
pub struct ListenerBuilder {
    address: Result<Address>,
    settings: Settings,
    allow_remote_without_key: bool,
    max_handshakes: usize,
    socket_mode: u32,
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

    /// How long a peer may take to finish the whole handshake, every byte of both
    /// directions ([`DEFAULT_HANDSHAKE_TIMEOUT`] by default); then its socket is closed.
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.settings.handshake_timeout = d;
        self
    }

    /// How many handshakes may be in flight at once ([`DEFAULT_MAX_HANDSHAKES`] by
    /// default). A new peer beyond that closes the pending peer that has waited longest;
    /// while that many authenticated connections wait for [`Listener::accept`], new
    /// peers wait in the kernel's backlog. Each pending handshake costs one descriptor
    /// and a few hundred bytes, never a thread.
    pub fn max_handshakes(mut self, n: usize) -> Self {
        self.max_handshakes = n.max(1);
        self
    }

    /// The permissions of the Unix socket file the listener creates
    /// ([`DEFAULT_SOCKET_MODE`], `0o600`, by default; the umask does not apply). Only
    /// those who may write to the file may connect.
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.socket_mode = mode & 0o777;
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
                let (l, file) = bind_unix(p, self.socket_mode)?;
                (Socket::Unix(l), address.clone(), Some(file))
            }
            Address::Abstract(name) => {
                let a = unix::SocketAddr::from_abstract_name(name)?;
                let l = UnixListener::bind_addr(&a)?;
                (Socket::Unix(l), address.clone(), None)
            }
        };
        let incoming = match &self.settings.authkey {
            None => {
                socket.set_nonblocking()?;
                Incoming::Direct(socket)
            }
            Some(key) => Incoming::Handshaking(Acceptor::start(
                socket,
                Limits {
                    key: key.clone(),
                    policy: self.settings.policy.clone(),
                    handshake_timeout: self.settings.handshake_timeout,
                    max_handshakes: self.max_handshakes,
                    max_message: self.settings.max_message,
                },
            )?),
        };
        Ok(Listener {
            incoming,
            interrupted: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(eventfd()?),
            address,
            settings: self.settings,
            _socket_file: unlink,
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
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            socket_mode: DEFAULT_SOCKET_MODE,
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

    /// Waits for the next peer; with a key, the next peer that has completed the
    /// handshake (peers that fail it are closed and not reported here).
    ///
    /// # Errors
    /// Without a key, what the system's `accept` reports (e.g. `EMFILE`), after which
    /// the listener stays usable; with a key, only [`Error::Io`] if the listener's
    /// acceptor thread could not go on.
    pub fn accept(&self) -> Result<Connection> {
        self.accept_until(None)
    }

    /// [`accept`](Self::accept), waiting at most `timeout`.
    ///
    /// ```
    /// use multiprocess::connection::Listener;
    /// use std::time::Duration;
    /// let l = Listener::bind("127.0.0.1:0", Some("k".into()))?;
    /// let e = l.accept_timeout(Duration::from_millis(10)).unwrap_err();
    /// assert!(e.is_timeout());
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Timeout`] if no peer came in time; otherwise as [`accept`](Self::accept).
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Connection> {
        self.accept_until(Some(Instant::now() + timeout))
    }

    /// A handle that makes this listener's `accept`, blocked in another thread or to
    /// come, fail at once (a server's stop).
    pub(crate) fn interrupter(&self) -> Interrupter {
        Interrupter {
            interrupted: self.interrupted.clone(),
            wake: self.wake.clone(),
            acceptor: match &self.incoming {
                Incoming::Handshaking(a) => Some(a.stopper()),
                Incoming::Direct(_) => None,
            },
        }
    }

    fn check_interrupted(&self) -> Result<()> {
        if self.interrupted.load(Ordering::SeqCst) {
            return Err(Error::Io(io::Error::other("the listener was stopped")));
        }
        Ok(())
    }

    fn accept_until(&self, deadline: Option<Instant>) -> Result<Connection> {
        self.check_interrupted()?;
        let (conn, peer) = match &self.incoming {
            Incoming::Handshaking(a) => {
                let next = a.next(deadline);
                self.check_interrupted()?;
                next?
            }
            Incoming::Direct(socket) => loop {
                self.check_interrupted()?;
                match socket.accept() {
                    Ok((fd, peer)) => {
                        let mut conn = Connection::from_fd(fd, true, true);
                        conn.set_max_message_size(self.settings.max_message);
                        conn.refuse_descriptors();
                        break (conn, peer);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let left = match deadline {
                            None => None,
                            Some(d) => {
                                let left = d.saturating_duration_since(Instant::now());
                                if left.is_zero() {
                                    return Err(Error::timeout());
                                }
                                Some(left)
                            }
                        };
                        poll_readable(&[socket.as_fd(), self.wake.as_fd()], left)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            },
        };
        *self.last_accepted.lock().unwrap_or_else(|p| p.into_inner()) = Some(peer);
        Ok(conn)
    }
}

/// Makes a [`Listener`]'s `accept` fail at once, from any thread (see
/// [`Listener::interrupter`]); the listener takes no peer from then on.
#[derive(Clone)]
pub(crate) struct Interrupter {
    interrupted: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    acceptor: Option<super::acceptor::Stopper>,
}

impl Interrupter {
    pub(crate) fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        eventfd_signal(self.wake.as_fd());
        if let Some(a) = &self.acceptor {
            a.stop();
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

    /// How long the listener may take to finish the whole handshake
    /// ([`DEFAULT_HANDSHAKE_TIMEOUT`] by default).
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
        finish(fd, &self.settings)
    }
}

/// Runs the client's handshake (if keyed) on a fresh socket and wraps it.
fn finish(fd: OwnedFd, settings: &Settings) -> Result<Connection> {
    if let Some(key) = &settings.authkey {
        let mut t = TimedSocket {
            fd: fd.as_fd(),
            deadline: Instant::now() + settings.handshake_timeout,
        };
        let key = key.as_bytes();
        auth::answer_challenge(&mut t, key)?;
        auth::deliver_challenge(&mut t, key, &settings.policy)?;
    }
    let mut conn = Connection::from_fd(fd, true, true);
    conn.set_max_message_size(settings.max_message);
    conn.refuse_descriptors();
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
            // Descriptors passed during the handshake are closed at once.
            let mut passed = Vec::new();
            match socket::recvmsg(self.fd, &mut buf[filled..], &mut passed, true) {
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
        acceptor::send(self.fd, msg)
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

    /// An `accept` blocked for ever in one thread fails as soon as another interrupts the
    /// listener, keyed (handshakes on the acceptor thread) or not; later ones fail too.
    #[test]
    fn an_interrupted_listener_wakes_its_blocked_accept() {
        for key in [None, Some(AuthKey::new("k"))] {
            let l = Arc::new(Listener::bind("127.0.0.1:0", key.clone()).unwrap());
            let stop = l.interrupter();
            let (tx, rx) = std::sync::mpsc::channel();
            let waiting = l.clone();
            let t = std::thread::spawn(move || tx.send(waiting.accept().map(drop)).unwrap());
            // The accept is blocked (nobody connects); no answer yet.
            assert!(rx.recv_timeout(Duration::from_millis(20)).is_err());
            stop.interrupt();
            let got = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("accept woke up");
            assert!(got.is_err(), "{key:?}");
            t.join().unwrap();
            assert!(l.accept_timeout(Duration::from_secs(10)).is_err());
        }
    }

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
    fn wrong_key_is_closed_and_right_key_accepted() {
        let l = Listener::bind("127.0.0.1:0", Some("right".into())).unwrap();
        let addr = l.address().clone();
        let bad = Client::new(&addr).authkey("wrong").connect().unwrap_err();
        assert!(
            matches!(&bad, Error::Authentication(m) if m == "digest sent was rejected"),
            "{bad}"
        );
        let good = Client::new(&addr).authkey("right").connect().unwrap();
        good.send_bytes(b"hi").unwrap();
        let c = l.accept().unwrap();
        assert_eq!(c.recv_bytes().unwrap(), b"hi");
        assert!(matches!(l.last_accepted(), Some(Address::Inet { .. })));
    }

    #[test]
    fn silent_peer_is_closed_at_the_deadline_and_costs_others_nothing() {
        let dir = std::env::temp_dir().join(format!("mp-listener-{}", std::process::id()));
        let l = Listener::builder(dir.as_path())
            .authkey("k")
            .handshake_timeout(Duration::from_millis(300))
            .bind()
            .unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut silent = UnixStream::connect(&dir).unwrap();
        let c = Client::new(dir.as_path()).authkey("k").connect().unwrap();
        c.send_bytes(b"x").unwrap();
        assert_eq!(l.accept().unwrap().recv_bytes().unwrap(), b"x");
        // The silent peer got its challenge, then end of file at the deadline.
        silent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut all = Vec::new();
        io::Read::read_to_end(&mut silent, &mut all).unwrap();
        assert!(all.windows(11).any(|w| w == auth::CHALLENGE));
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
        let c = t.join().unwrap();
        // The listener closed the peer without a verdict.
        assert!(c.recv_bytes().is_err());
        assert!(l
            .accept_timeout(Duration::from_millis(50))
            .unwrap_err()
            .is_timeout());
    }
}
