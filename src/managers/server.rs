//! The manager server: owns the objects, speaks CPython's manager protocol.

use super::objects::{self, Answer, Call, PyException, Served};
use super::wire::{self, Request};
use crate::connection::{Address, AuthKey, Connection, Interrupter, Listener};
use crate::error::{Error, Result};
use crate::reduction::pickle::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::ToSocketAddrs;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Makes a served object from the arguments of `create` (positional, keyword).
pub type Factory = Arc<
    dyn Fn(&[Value], &[(String, Value)]) -> std::result::Result<Arc<dyn Served>, PyException>
        + Send
        + Sync,
>;

/// How often the accept loop looks at the stop flag, besides being woken by a stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// The stack of each connection thread: decoding, comparing, `repr` and encoding walk
/// values recursively, up to [`wire::MAX_DEPTH`] levels deep (unoptimized builds use
/// far more stack per level than optimized ones). Untouched pages cost nothing.
const CONNECTION_STACK: usize = 16 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Configures a [`Server`]: address, key, and the type ids clients may `create`.
#[must_use]
pub struct ServerBuilder {
    address: Result<Address>,
    authkey: Option<AuthKey>,
    registry: BTreeMap<String, Factory>,
    max_message: Option<u64>,
    allow_remote_without_key: bool,
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("address", &self.address)
            .field("typeids", &self.registry.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ServerBuilder {
    /// The key clients must prove they know (CPython's `authkey`). Without one there is
    /// no handshake, and binding a non-loopback TCP address is refused.
    pub fn authkey(mut self, key: impl Into<AuthKey>) -> Self {
        self.authkey = Some(key.into());
        self
    }

    /// Sets or clears the key.
    pub fn authkey_opt(mut self, key: Option<AuthKey>) -> Self {
        self.authkey = key;
        self
    }

    /// Registers a type id (Python's `BaseManager.register(typeid, callable)`): a
    /// client's `create(typeid, *args, **kwargs)` calls `factory(args, kwargs)` and
    /// serves the object it returns, exposing [`Served::exposed`].
    ///
    /// A factory that builds a new object makes one per call, so every client gets its
    /// own (as `m.dict()` does). To share **one** object between unrelated client
    /// processes — Python's `register('get_queue', callable=lambda: queue)` — hand out the
    /// same `Arc` each time, which is what [`share`](Self::share) does. Here two client
    /// processes (started from a test binary or anywhere) see one dict:
    ///
    /// ```no_run
    /// use multiprocess::managers::{objects::Dict, DictProxy, Manager, Server};
    /// use std::sync::Arc;
    /// // The server process.
    /// let shared = Arc::new(Dict::default());
    /// let server = Server::builder("127.0.0.1:50000")
    ///     .authkey("k")
    ///     .register("get_dict", move |_args, _kwargs| Ok(shared.clone()))
    ///     .bind()?;
    /// server.serve_forever()?;
    ///
    /// // Client process one:
    /// let m = Manager::connect("127.0.0.1:50000", "k")?;
    /// let d: DictProxy<String, i64> = m.get("get_dict")?;
    /// d.insert(&"answer".to_string(), &42)?;
    ///
    /// // Client process two, later, sees the same dict:
    /// let m = Manager::connect("127.0.0.1:50000", "k")?;
    /// let d: DictProxy<String, i64> = m.get("get_dict")?;
    /// assert_eq!(d.get(&"answer".to_string())?, Some(42));
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    pub fn register<F>(mut self, typeid: impl Into<String>, factory: F) -> Self
    where
        F: Fn(&[Value], &[(String, Value)]) -> std::result::Result<Arc<dyn Served>, PyException>
            + Send
            + Sync
            + 'static,
    {
        self.registry.insert(typeid.into(), Arc::new(factory));
        self
    }

    /// Serves one existing object under `typeid`: every client's `create(typeid)` (Rust
    /// [`Manager::get`](super::Manager::get), Python `m.typeid()`) gets a proxy to this
    /// same object. Python's `register(typeid, callable=lambda: obj)`.
    pub fn share(self, typeid: impl Into<String>, object: Arc<dyn Served>) -> Self {
        self.register(typeid, move |_args, _kwargs| Ok(object.clone()))
    }

    /// Registers every type id of CPython's `SyncManager`: `dict`, `list`, `Queue`,
    /// `JoinableQueue`, `Value`, `Array`, `Namespace`, `Lock`, `RLock`, `Semaphore`,
    /// `BoundedSemaphore`, `Event`, `Condition`, `Barrier`, and 3.14's `set`; `Pool`
    /// answers with an error (its tasks are Python functions).
    pub fn sync_manager_types(mut self) -> Self {
        for (name, f) in sync_manager_registry() {
            self.registry.insert(name.to_string(), f);
        }
        self
    }

    /// The largest request accepted (default 64 MiB); a bigger length prefix closes
    /// that connection.
    pub fn max_message_size(mut self, max: Option<u64>) -> Self {
        self.max_message = max;
        self
    }

    /// Allows a non-loopback TCP address without a key (anyone who reaches the port
    /// then controls the objects). Refused unless you opt in.
    pub fn allow_remote_without_authkey(mut self, yes: bool) -> Self {
        self.allow_remote_without_key = yes;
        self
    }

    /// Binds the address. Nothing is served until [`Server::serve_forever`].
    pub fn bind(self) -> Result<Server> {
        let address = self.address?;
        if let Address::Inet { host, port } = &address {
            if self.authkey.is_none() && !self.allow_remote_without_key {
                let remote = (host.as_str(), *port)
                    .to_socket_addrs()?
                    .any(|a| !a.ip().is_loopback());
                if remote {
                    return Err(Error::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!(
                            "refusing to serve a manager on non-loopback address {address} \
                             without an authkey"
                        ),
                    )));
                }
            }
        }
        // The listener runs every handshake off the accept path, under one deadline
        // each: a connection thread starts only for an authenticated peer.
        let listener = Listener::builder(address)
            .authkey_opt(self.authkey.clone())
            .allow_remote_without_authkey(true)
            .max_message_size(self.max_message)
            .bind()?;
        let token_address = match listener.address() {
            Address::Inet { host, port } => {
                Value::Tuple(vec![Value::String(host.clone()), Value::I64(*port as i64)])
            }
            Address::Unix(p) => Value::String(p.display().to_string()),
            Address::Abstract(n) => Value::String(format!("\0{}", String::from_utf8_lossy(n))),
        };
        Ok(Server {
            shared: Arc::new(Shared {
                address: listener.address().clone(),
                token_address,
                registry: self.registry,
                objects: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0x1000),
                next_conn: AtomicU64::new(1),
                stop: AtomicBool::new(false),
                accepting: listener.interrupter(),
                live: Mutex::new(HashMap::new()),
                pinned: Mutex::new(Default::default()),
            }),
            listener,
        })
    }
}

pub(crate) fn sync_manager_registry() -> Vec<(&'static str, Factory)> {
    fn f<F>(f: F) -> Factory
    where
        F: Fn(&[Value], &[(String, Value)]) -> std::result::Result<Arc<dyn Served>, PyException>
            + Send
            + Sync
            + 'static,
    {
        Arc::new(f)
    }
    fn int_arg(
        args: &[Value],
        kwargs: &[(String, Value)],
        i: usize,
        name: &str,
        default: i64,
    ) -> std::result::Result<i64, PyException> {
        match args
            .get(i)
            .or_else(|| kwargs.iter().find(|(k, _)| k == name).map(|(_, v)| v))
        {
            None => Ok(default),
            Some(Value::I64(n)) => Ok(*n),
            Some(Value::Bool(b)) => Ok(*b as i64),
            Some(_) => Err(PyException::type_error(format!("{name} must be an int"))),
        }
    }
    vec![
        ("dict", f(|a, k| Ok(Arc::new(objects::Dict::new(a, k)?)))),
        ("list", f(|a, _| Ok(Arc::new(objects::List::new(a)?)))),
        ("set", f(|a, _| Ok(Arc::new(objects::Set::new(a)?)))),
        (
            "Queue",
            f(|a, k| {
                Ok(Arc::new(objects::Queue::new(
                    int_arg(a, k, 0, "maxsize", 0)?.max(0) as usize,
                )))
            }),
        ),
        (
            "JoinableQueue",
            f(|a, k| {
                Ok(Arc::new(objects::Queue::new(
                    int_arg(a, k, 0, "maxsize", 0)?.max(0) as usize,
                )))
            }),
        ),
        (
            "Value",
            f(|a, k| {
                let code = match a.first() {
                    Some(Value::String(s)) => s.clone(),
                    _ => "O".into(),
                };
                let v = a
                    .get(1)
                    .or_else(|| k.iter().find(|(n, _)| n == "value").map(|(_, v)| v))
                    .cloned()
                    .unwrap_or(Value::None);
                Ok(Arc::new(objects::ValueCell::new(code, v)))
            }),
        ),
        (
            "Namespace",
            f(|_, k| Ok(Arc::new(objects::Namespace::new(k)))),
        ),
        (
            "Array",
            f(|a, k| {
                let seq = a
                    .get(1)
                    .or_else(|| k.iter().find(|(n, _)| n == "sequence").map(|(_, v)| v))
                    .ok_or_else(|| PyException::type_error("Array needs a sequence"))?;
                match a.first() {
                    Some(Value::String(code)) => Ok(Arc::new(objects::Array::typed(code, seq)?)),
                    _ => Ok(Arc::new(objects::Array::new(seq)?)),
                }
            }),
        ),
        (
            "Lock",
            f(|_, _| Ok(Arc::new(objects::Semaphore::new(1, Some(1), true)))),
        ),
        ("RLock", f(|_, _| Ok(Arc::new(objects::RLock::default())))),
        (
            "Semaphore",
            f(|a, k| {
                let v = int_arg(a, k, 0, "value", 1)?;
                Ok(Arc::new(objects::Semaphore::new(v, None, false)))
            }),
        ),
        (
            "BoundedSemaphore",
            f(|a, k| {
                let v = int_arg(a, k, 0, "value", 1)?;
                Ok(Arc::new(objects::Semaphore::new(v, Some(v), false)))
            }),
        ),
        ("Event", f(|_, _| Ok(Arc::new(objects::Event::default())))),
        (
            "Condition",
            f(|_, _| Ok(Arc::new(objects::Condition::default()))),
        ),
        (
            "Pool",
            f(|_, _| {
                Err(PyException::builtin(
                    "NotImplementedError",
                    "a Rust manager server does not serve Pool: its tasks are Python \
                     functions, and a Rust server cannot run Python code \
                     (use multiprocess::Pool, or CPython's own manager)",
                ))
            }),
        ),
        (
            "Barrier",
            f(|a, k| {
                if a.get(1)
                    .or_else(|| k.iter().find(|(n, _)| n == "action").map(|(_, v)| v))
                    .is_some_and(|v| *v != Value::None)
                {
                    return Err(PyException::type_error(
                        "Barrier(action=...) is refused: a Rust manager server cannot run \
                         Python code",
                    ));
                }
                let n = int_arg(a, k, 0, "parties", 0)?;
                if n <= 0 {
                    return Err(PyException::builtin("ValueError", "parties must be > 0"));
                }
                let t = match a
                    .get(2)
                    .or_else(|| k.iter().find(|(n, _)| n == "timeout").map(|(_, v)| v))
                {
                    Some(Value::I64(i)) => Some(*i as f64),
                    Some(Value::F64(x)) => Some(*x),
                    _ => None,
                };
                Ok(Arc::new(objects::Barrier::new(n as usize, t)))
            }),
        ),
    ]
}

struct Entry {
    object: Arc<dyn Served>,
    /// All references: `loose` ones plus those owned by method-call channels.
    refs: u64,
    /// References handed out by `create`, `incref` and `#PROXY` replies and not yet
    /// adopted by a channel: the only ones `#ADOPT` and a control `decref` may take.
    loose: u64,
}

struct Shared {
    address: Address,
    token_address: Value,
    registry: BTreeMap<String, Factory>,
    objects: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
    next_conn: AtomicU64,
    stop: AtomicBool,
    /// Wakes the accept loop when the server is stopped.
    accepting: Interrupter,
    /// Every open client connection (a duplicate of its socket), so that stopping can
    /// shut them down and free their threads.
    live: Mutex<HashMap<u64, OwnedFd>>,
    /// Objects named by a proxy that arrived in a request (see `pin_proxies`).
    pinned: Mutex<std::collections::HashSet<String>>,
}

/// A manager server (Python's `multiprocessing.managers.Server`): holds objects and
/// answers requests from Rust proxies and CPython clients alike.
///
/// With a key, the listener authenticates every peer off the accept path (see
/// [`Listener`]); each authenticated connection gets a thread. It reads one control request (`create`, `incref`, `decref`, `dummy`,
/// `get_methods`, `number_of_objects`, `debug_info`, `shutdown`) and answers it, or,
/// after `accept_connection`, serves method calls until the peer hangs up.
///
/// **Malformed input** (a bad pickle, a pickle whose memo references would expand it
/// beyond a size limit, containers nested deeper than [`wire::MAX_DEPTH`], a text
/// integer of more than [`wire::MAX_INT_DIGITS`] digits, a request of the wrong shape,
/// an unknown object id or method) is answered with `('#TRACEBACK', text)`, which
/// CPython clients raise as `RemoteError`; an operation whose result would take more
/// than 64 MiB (`list * n`, `list.extend(text)`) raises `MemoryError`; an oversized
/// length prefix or a failed handshake closes that connection. The server itself never
/// stops for a client's mistake, and other clients are unaffected.
///
/// **References a client holds.** `#ADOPT` (a Rust proxy tying a reference to its
/// channel) and a control `decref` take only a reference that was handed out
/// (`create`, `incref`, a returned proxy) and not yet adopted: a client cannot take over,
/// and so release, references that other clients' channels own.
///
/// **References and dead clients.** An object lives while its reference count is
/// above zero. References taken with `create`/`incref` (CPython clients, and proxies
/// in flight between Rust processes) last until `decref`, as in CPython: if such a client
/// dies, its objects stay until the server stops. A Rust proxy turns its reference into
/// one *owned by its method-call connection*: when that connection closes — the proxy
/// was dropped or its process died, even by `SIGKILL` — the server drops the reference.
/// A blocking call (`Queue.get`, `Lock.acquire`…) whose client hangs up is abandoned
/// within 100 ms, so a dead client never consumes an item; locks, semaphores, `RLock`s
/// and `Condition`s it holds through that connection are released (unlike CPython,
/// where a dead client's lock stays held).
pub struct Server {
    listener: Listener,
    shared: Arc<Shared>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("address", &self.shared.address)
            .finish()
    }
}

/// Stops a running [`Server`] from another thread.
#[derive(Clone)]
pub struct StopHandle(Arc<Shared>);

impl fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StopHandle").field(&self.0.address).finish()
    }
}

impl StopHandle {
    /// Makes `serve_forever` return and closes every client connection.
    pub fn stop(&self) {
        self.0.stop();
    }
}

impl Server {
    /// A builder for a server on `address` (`"127.0.0.1:0"`, a socket path…) with no
    /// type ids registered.
    pub fn builder(address: impl crate::connection::ToAddress) -> ServerBuilder {
        ServerBuilder {
            address: address.to_address(),
            authkey: None,
            registry: BTreeMap::new(),
            max_message: Some(64 << 20),
            allow_remote_without_key: false,
        }
    }

    /// A server with CPython's `SyncManager` type ids, bound to `address` with `authkey`:
    /// what `examples/manager_server.rs` runs.
    pub fn sync_manager(
        address: impl crate::connection::ToAddress,
        authkey: Option<AuthKey>,
    ) -> Result<Server> {
        Server::builder(address)
            .authkey_opt(authkey)
            .sync_manager_types()
            .bind()
    }

    /// The address it listens on (with the real port when 0 was asked for).
    pub fn address(&self) -> &Address {
        &self.shared.address
    }

    /// The registered type ids.
    pub fn typeids(&self) -> Vec<String> {
        self.shared.registry.keys().cloned().collect()
    }

    /// The number of live objects.
    pub fn number_of_objects(&self) -> usize {
        lock(&self.shared.objects).len()
    }

    /// A handle that stops the server from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.clone())
    }

    /// Serves until a client sends `shutdown` or [`StopHandle::stop`] is called; then
    /// closes every client connection and returns.
    /// With a key, the authkey handshake runs off the accept path under the listener's
    /// deadline ([`crate::connection::DEFAULT_HANDSHAKE_TIMEOUT`]): a peer that has not
    /// finished it by then is closed, and only authenticated peers get a thread.
    pub fn serve_forever(&self) -> Result<()> {
        let mut failures = 0u32;
        while !self.shared.stop.load(Ordering::SeqCst) {
            match self.listener.accept_timeout(STOP_CHECK) {
                Ok(conn) => {
                    failures = 0;
                    if self.shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let shared = self.shared.clone();
                    let spawned = std::thread::Builder::new()
                        .name("manager-conn".into())
                        .stack_size(CONNECTION_STACK)
                        .spawn(move || shared.handle(conn));
                    if spawned.is_err() {
                        // Out of threads: that client is refused (its connection was
                        // moved into the failed closure and is closed).
                        continue;
                    }
                }
                Err(Error::Timeout { .. }) => {}
                Err(_) if self.shared.stop.load(Ordering::SeqCst) => break,
                Err(_) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    failures = (failures + 1).min(10);
                    std::thread::sleep(Duration::from_millis(1 << failures.min(6)));
                }
            }
        }
        self.shared.close_all();
        Ok(())
    }
}

fn traceback(kind: &str, msg: impl fmt::Display) -> Vec<u8> {
    wire::encode_traceback(&format!(
        "Traceback (most recent call last):\n  (in the Rust manager server)\n{kind}: {msg}\n"
    ))
}

impl Shared {
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.accepting.interrupt();
    }

    fn close_all(&self) {
        for (_, fd) in lock(&self.live).drain() {
            let s = std::os::unix::net::UnixStream::from(fd);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        lock(&self.objects).clear();
    }

    fn handle(self: Arc<Self>, conn: Connection) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(dup) = conn.as_fd().try_clone_to_owned() {
            lock(&self.live).insert(id, dup);
        }
        if self.stop.load(Ordering::SeqCst) {
            lock(&self.live).remove(&id);
            return;
        }
        let _ = self.serve_connection(&conn, id);
        lock(&self.live).remove(&id);
    }

    fn serve_connection(&self, conn: &Connection, id: u64) -> Result<()> {
        let bytes = conn.recv_bytes()?;
        let req = match wire::decode_request(&bytes) {
            Ok(r) => r,
            Err(e) => return conn.send_bytes(&traceback("ValueError", e)),
        };
        match req.method.as_str() {
            "accept_connection" => {
                conn.send_bytes(&wire::encode_return(&Value::None))?;
                self.serve_channel(conn, id)
            }
            "shutdown" => {
                let ok = wire::encode_return(&Value::None);
                conn.send_bytes(&ok)?;
                let _ = conn.send_bytes(&ok);
                self.stop();
                Ok(())
            }
            _ => {
                let reply = match self.control(&req) {
                    Ok(v) => wire::encode_return(&v),
                    Err((kind, msg)) => traceback(&kind, msg),
                };
                conn.send_bytes(&reply)
            }
        }
    }

    fn ident_arg(req: &Request) -> std::result::Result<String, (String, String)> {
        match req.args.first() {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(("TypeError".into(), "expected an object id (str)".into())),
        }
    }

    fn control(&self, req: &Request) -> std::result::Result<Value, (String, String)> {
        let key_error = |id: &str| ("KeyError".to_string(), format!("'{id}'"));
        match req.method.as_str() {
            "dummy" => Ok(Value::None),
            "create" => {
                let typeid = match req.args.first() {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(("TypeError".into(), "create needs a typeid".into())),
                };
                let factory = self.registry.get(&typeid).ok_or_else(|| {
                    (
                        "AssertionError".to_string(),
                        format!("unknown typeid {typeid:?}"),
                    )
                })?;
                self.pin_proxies(&req.args, &req.kwargs);
                let object = factory(&req.args[1..], &req.kwargs)
                    .map_err(|e| (e.name.clone(), e.to_string()))?;
                let exposed = names(object.exposed());
                let ident = self.register(object);
                Ok(Value::Tuple(vec![Value::String(ident), exposed]))
            }
            "incref" => {
                let id = Self::ident_arg(req)?;
                match lock(&self.objects).get_mut(&id) {
                    Some(e) => {
                        e.refs += 1;
                        e.loose += 1;
                        Ok(Value::None)
                    }
                    None => Err(key_error(&id)),
                }
            }
            "decref" => {
                let id = Self::ident_arg(req)?;
                // Only a reference somebody holds outside a channel: references owned
                // by Rust proxies' channels are released when those close.
                if !self.take_loose(&id) {
                    return Err(key_error(&id));
                }
                self.decref(&id, 1).map_err(|_| key_error(&id))?;
                Ok(Value::None)
            }
            "get_methods" => {
                // The token arrives as its state tuple (typeid, address, id).
                let id = match req.args.first() {
                    Some(Value::Tuple(t)) if t.len() == 3 => match &t[2] {
                        Value::String(s) => s.clone(),
                        _ => String::new(),
                    },
                    _ => String::new(),
                };
                match lock(&self.objects).get(&id) {
                    Some(e) => Ok(names(e.object.exposed())),
                    None => Err(key_error(&id)),
                }
            }
            "number_of_objects" => Ok(Value::I64(lock(&self.objects).len() as i64)),
            "debug_info" => {
                let objs = lock(&self.objects);
                let mut lines: Vec<String> = objs
                    .iter()
                    .map(|(k, e)| format!("  {k}:       refcount={}", e.refs))
                    .collect();
                lines.sort();
                Ok(Value::String(lines.join("\n")))
            }
            other => Err(("AssertionError".into(), format!("{other:?} unrecognized"))),
        }
    }

    /// Proxies to this server's objects passed in a request may be stored in a shared
    /// object: the server keeps one reference to each such object until it stops, as
    /// CPython's server does (`id_to_local_proxy_obj`), so the sender dropping its proxy
    /// does not free what another object still names.
    fn pin_proxies(&self, args: &[Value], kwargs: &[(String, Value)]) {
        let mut found = Vec::new();
        for v in args.iter().chain(kwargs.iter().map(|(_, v)| v)) {
            super::pyobj::proxies_in(v, &mut found);
        }
        if found.is_empty() {
            return;
        }
        let mut pinned = lock(&self.pinned);
        let mut objs = lock(&self.objects);
        for p in found {
            if p.address == self.token_address && !pinned.contains(&p.ident) {
                if let Some(e) = objs.get_mut(&p.ident) {
                    e.refs += 1;
                    pinned.insert(p.ident);
                }
            }
        }
    }

    fn register(&self, object: Arc<dyn Served>) -> String {
        let ident = format!("{:x}", self.next_id.fetch_add(1, Ordering::Relaxed));
        lock(&self.objects).insert(
            ident.clone(),
            Entry {
                object,
                refs: 1,
                loose: 1,
            },
        );
        ident
    }

    /// Takes one loose reference of `ident` (for `#ADOPT` or a control `decref`);
    /// false when there is none: nobody holds a reference outside the channels.
    fn take_loose(&self, ident: &str) -> bool {
        match lock(&self.objects).get_mut(ident) {
            Some(e) if e.loose > 0 => {
                e.loose -= 1;
                true
            }
            _ => false,
        }
    }

    fn decref(&self, ident: &str, n: u64) -> std::result::Result<(), ()> {
        let dropped = {
            let mut objs = lock(&self.objects);
            let e = objs.get_mut(ident).ok_or(())?;
            e.refs = e.refs.saturating_sub(n);
            if e.refs == 0 {
                objs.remove(ident)
            } else {
                None
            }
        };
        // The object is dropped here, outside the table lock.
        drop(dropped);
        Ok(())
    }

    fn serve_channel(&self, conn: &Connection, caller: u64) -> Result<()> {
        // References this channel owns ('#ADOPT'): released when it closes.
        let mut owned: HashMap<String, u64> = HashMap::new();
        // Objects it called: told when it closes, to release what it holds.
        let mut touched: HashMap<String, Weak<dyn Served>> = HashMap::new();
        let result = loop {
            if self.stop.load(Ordering::SeqCst) {
                break Ok(());
            }
            let bytes = match conn.recv_bytes() {
                Ok(b) => b,
                Err(Error::Eof) => break Ok(()),
                Err(e) => break Err(e),
            };
            let reply = self.method_call(conn, caller, &bytes, &mut owned, &mut touched);
            if let Err(e) = conn.send_bytes(&reply) {
                break Err(e);
            }
        };
        for object in touched.into_values().filter_map(|w| w.upgrade()) {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                object.caller_gone(caller)
            }));
        }
        for (ident, n) in owned {
            let _ = self.decref(&ident, n);
        }
        result
    }

    fn method_call(
        &self,
        conn: &Connection,
        caller: u64,
        bytes: &[u8],
        owned: &mut HashMap<String, u64>,
        touched: &mut HashMap<String, Weak<dyn Served>>,
    ) -> Vec<u8> {
        let req = match wire::decode_request(bytes) {
            Ok(r) => r,
            Err(e) => return traceback("ValueError", e),
        };
        let Some(ident) = req.ident else {
            return traceback(
                "KeyError",
                "None (control requests need their own connection)",
            );
        };
        let object = match lock(&self.objects).get(&ident) {
            Some(e) => e.object.clone(),
            None => return traceback("KeyError", format!("'{ident}'")),
        };
        self.pin_proxies(&req.args, &req.kwargs);
        let method = req.method.as_str();
        if !object.exposed().contains(&method) {
            return match method {
                // Rust proxies: make one of the caller's references owned by this
                // channel, so that it is released when the channel closes.
                "#ADOPT" => {
                    // Only a reference the caller holds: one handed out and not yet
                    // adopted or released (a client cannot adopt, and so release on
                    // hang-up, references other channels own).
                    if !self.take_loose(&ident) {
                        return traceback(
                            "KeyError",
                            format!("'{ident}' has no reference to adopt"),
                        );
                    }
                    *owned.entry(ident).or_insert(0) += 1;
                    wire::encode_return(&Value::None)
                }
                "#GETVALUE" => wire::encode_return(&object.snapshot()),
                "__str__" | "__repr__" => wire::encode_return(&Value::String(object.repr())),
                _ => traceback(
                    "AttributeError",
                    format!(
                        "method {method:?} of object {ident:?} is not in exposed={:?}",
                        object.exposed()
                    ),
                ),
            };
        }
        if !touched.contains_key(&ident) {
            touched.insert(ident.clone(), Arc::downgrade(&object));
        }
        let hung_up = || conn.poll(Some(Duration::ZERO)).unwrap_or(true);
        let call = Call {
            method,
            args: req.args,
            kwargs: req.kwargs,
            caller,
            hung_up: &hung_up,
        };
        // A panic inside a served object's method must not kill the server.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| object.call(call)));
        match outcome {
            Ok(Ok(Answer::Return(v))) => wire::encode_return(&v),
            Ok(Ok(Answer::Proxy { typeid, object })) => {
                let exposed = object.exposed();
                let new_id = self.register(object.clone());
                wire::encode_proxy(exposed, &typeid, &self.token_address, &new_id)
            }
            Ok(Err(exc)) => wire::encode_error(&exc.module, &exc.name, &exc.args),
            Err(_) => traceback("SystemError", format!("method {method:?} panicked")),
        }
    }
}

fn names(exposed: &[&str]) -> Value {
    Value::Tuple(
        exposed
            .iter()
            .map(|s| Value::String(s.to_string()))
            .collect(),
    )
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Server>();
}
