//! Managers (Python's `multiprocessing.managers`): a server process owns objects —
//! dicts, lists, queues, values, namespaces, locks, events… — and other processes, on
//! this machine or another, use them through proxies. The wire protocol is CPython's,
//! so a CPython `SyncManager`/`BaseManager` client can use a Rust server, and Rust
//! proxies can use a CPython manager.
//!
//! ```
//! use multiprocess::managers::{DictProxy, Manager};
//! use multiprocess::Process;
//!
//! fn worker(d: DictProxy<String, i64>, n: i64) {
//!     d.insert(&format!("worker-{n}"), &(n * n)).unwrap();
//! }
//!
//! let manager = Manager::start()?;
//! let d = manager.dict::<String, i64>()?;
//! let procs: Vec<Process> = (1..=3).map(|n| Process::new(worker, (d.clone(), n))).collect();
//! for p in &procs { p.start()?; }
//! for p in &procs { p.join()?; }
//! let mut items = d.items()?;
//! items.sort();
//! assert_eq!(items, [("worker-1".into(), 1), ("worker-2".into(), 4), ("worker-3".into(), 9)]);
//! manager.shutdown()?;
//! # Ok::<(), multiprocess::Error>(())
//! ```
//!
//! | Python | Rust |
//! |---|---|
//! | `SyncManager()`, `Manager()`, `.start()` | [`Manager::start`], [`Manager::builder`] |
//! | `BaseManager(address, authkey).connect()` | [`Manager::connect`] |
//! | `manager.shutdown()` | [`Manager::shutdown`] |
//! | `manager.dict()`, `.list()`, `.Queue()`, `.JoinableQueue()`, `.Value()`, `.Namespace()` | [`Manager::dict`], [`list`](Manager::list), [`queue`](Manager::queue), [`joinable_queue`](Manager::joinable_queue), [`value`](Manager::value), [`namespace`](Manager::namespace) |
//! | `.Lock()`, `.RLock()`, `.Semaphore(n)`, `.BoundedSemaphore(n)`, `.Event()`, `.Condition()`, `.Barrier(n)` | [`Manager::lock`] … [`Manager::barrier`] |
//! | `BaseManager.register(typeid, callable)` + `start()` | [`ManagerBuilder::start_with`] + [`ServerBuilder::register`] |
//! | `BaseManager(...).get_server().serve_forever()` | [`Server::builder`] + [`Server::serve_forever`] |
//! | `BaseProxy._callmethod`, `_getvalue` | [`Proxy::call`], [`Proxy::get_value`] |
//! | `RemoteError`, exceptions of the referent | [`Error::Remote`] |
//!
//! # Data
//! Values are plain data as [`reduction::pickle`](crate::reduction::pickle) maps them
//! (None, bool, int, float, str, bytes, list, tuple, dict, set): a Rust proxy's `K`, `V`,
//! `T` are any serde types of that shape. A Rust server stores them as
//! [`Value`]; arbitrary Python objects (class
//! instances, nested proxies) cannot be stored on a Rust server — a CPython client
//! that sends one gets a `RemoteError`. A Rust server's dicts keep insertion order, but
//! a whole copy (`copy()`, `_getvalue()`) arrives with its keys sorted.
//!
//! # References and dead processes
//! Each proxy holds one reference to its object; the object is freed when the last
//! reference goes. With a Rust server, a Rust proxy's reference is tied to its
//! connection, so a process that dies (even by `SIGKILL`) releases its references.
//! Proxies in transit (serialized, not yet deserialized) hold a reference of their own.
//! Locks, semaphores, `RLock`s and `Condition`s held through a proxy's connection are
//! released when it closes, and a dead client's pending blocking call is abandoned.
//! CPython clients count references by `incref`/`decref` messages, as with a CPython
//! server: a killed CPython client leaks its references until the server stops. See
//! [`Server`] for the full rule.
//!
//! # The lost-update trap
//! Every proxy method is atomic on the server, but a read followed by a write is two
//! calls: two processes doing `d[k] = d[k] + 1` lose updates. Worse, a *nested* value is
//! a copy: `d["list"].append(1)` in Python (cpython gh-91192) — or, in Rust, getting a
//! `Vec` out of a dict and pushing to it — modifies the copy, never the stored value.
//! The idiom: take a manager lock around the read-modify-write, and write the whole
//! modified value back.
//!
//! ```
//! use multiprocess::managers::Manager;
//! let manager = Manager::start()?;
//! let d = manager.dict::<String, Vec<i32>>()?;
//! let lock = manager.lock()?;
//! d.insert(&"xs".to_string(), &vec![])?;
//! {
//!     let _held = lock.guard()?;                            // no one else between get and insert
//!     let mut xs = d.get(&"xs".to_string())?.unwrap();      // a copy
//!     xs.push(1);                                           // changes only the copy…
//!     d.insert(&"xs".to_string(), &xs)?;                    // …until written back
//! }
//! assert_eq!(d.get(&"xs".to_string())?, Some(vec![1]));
//! # Ok::<(), multiprocess::Error>(())
//! ```
//!
//! # Security
//! A manager executes requests from anyone who knows its key. [`Manager::start`]
//! listens on a private abstract Unix socket with a random key; a TCP server without a
//! key is refused unless it binds loopback (or you opt in). The Rust server never
//! executes pickled code: it only decodes plain data.

mod fast;
pub mod objects;
mod proxy;
mod pyobj;
pub mod server;
pub mod wire;

pub use objects::{Answer, Call, PyException, Served};
pub use proxy::{
    BarrierProxy, Called, ConditionProxy, DictProxy, EventProxy, FromProxy, ListProxy, LockProxy,
    NamespaceProxy, Proxy, ProxyLockGuard, QueueProxy, ValueProxy,
};
pub use server::{Factory, Server, ServerBuilder, StopHandle};

use crate::connection::{Address, AuthKey, Connection, ToAddress};
use crate::context::StartMethod;
use crate::error::{Error, Result};
use crate::process::Process;
use crate::reduction::pickle::Value;
use proxy::{to_value, Endpoint, WireAddr};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How long [`Manager::start`] waits for the server process to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Manager::shutdown`] waits for the server process to exit before killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A manager: a handle on a server process (started here, or reached by address)
/// through which objects are created (Python's `SyncManager`).
///
/// A manager started with [`Manager::start`] is shut down when the handle is dropped
/// (its objects go with it); one reached with [`Manager::connect`] is not.
#[doc(alias = "SyncManager")]
#[doc(alias = "BaseManager")]
pub struct Manager {
    endpoint: Endpoint,
    process: Option<Process>,
    stopped: AtomicBool,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("address", &self.address())
            .field("pid", &self.process.as_ref().and_then(|p| p.pid()))
            .finish()
    }
}

/// Configures [`Manager::start`]: address, key, start method.
#[derive(Debug, Default)]
#[must_use]
pub struct ManagerBuilder {
    address: Option<Result<Address>>,
    authkey: Option<AuthKey>,
    start_method: Option<StartMethod>,
}

impl ManagerBuilder {
    /// Where the server listens (default: a fresh abstract Unix socket). A TCP address
    /// reachable from other machines needs a key (the default key is random: pass it
    /// to the remote side, [`Manager::authkey`]).
    pub fn address(mut self, address: impl ToAddress) -> Self {
        self.address = Some(address.to_address());
        self
    }

    /// The key (default: 32 random bytes).
    pub fn authkey(mut self, key: impl Into<AuthKey>) -> Self {
        self.authkey = Some(key.into());
        self
    }

    /// How the server process is started (default: the context's start method).
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.start_method = Some(method);
        self
    }

    /// Starts the server process with CPython's `SyncManager` type ids and waits until
    /// it listens.
    pub fn start(self) -> Result<Manager> {
        self.start_with(sync_manager_process)
    }

    /// Starts a server process that runs `serve` — a fn item taking a [`ServerProcess`]
    /// — to choose the type ids it serves (Python's `BaseManager.register` before
    /// `start()`): the registrations are code, so they are made in the server process.
    ///
    /// ```
    /// use multiprocess::managers::{objects::List, Manager, ServerProcess};
    /// use std::sync::Arc;
    ///
    /// fn serve(p: ServerProcess) {
    ///     p.serve(|b| b.register("Stack", |_, _| Ok(Arc::new(List::default()))));
    /// }
    ///
    /// let manager = Manager::builder().start_with(serve)?;
    /// let stack = manager.create("Stack", (), &[])?;
    /// stack.call::<()>("append", ("a",))?;
    /// assert_eq!(stack.call::<String>("pop", ())?, "a");
    /// assert!(manager.dict::<i32, i32>().is_err(), "only Stack is registered");
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    pub fn start_with<F, M>(self, serve: F) -> Result<Manager>
    where
        F: crate::Target<ServerProcess, M>,
        F::Output: crate::Outcome,
    {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let address = match self.address {
            Some(a) => a?,
            None => {
                let nonce = AuthKey::random()?;
                let tag: String = nonce.as_bytes()[..6]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                Address::Abstract(
                    format!(
                        "multiprocess-manager-{}-{}-{tag}",
                        std::process::id(),
                        COUNTER.fetch_add(1, Ordering::Relaxed)
                    )
                    .into_bytes(),
                )
            }
        };
        let authkey = match self.authkey {
            Some(k) => k,
            None => AuthKey::random()?,
        };
        let (ours, theirs) = crate::connection::pipe()?;
        let mut builder = Process::builder().name("SyncManager").daemon(true);
        if let Some(m) = self.start_method {
            builder = builder.start_method(m);
        }
        let process = builder.build(
            serve,
            ServerProcess {
                ready: theirs,
                address: WireAddr::from(&address),
                authkey: authkey.as_bytes().to_vec(),
            },
        );
        process.start()?;
        let bound = match wait_ready(&ours, &process) {
            Ok(b) => b,
            Err(e) => {
                let _ = process.kill();
                let _ = process.join_timeout(STOP_TIMEOUT);
                return Err(e);
            }
        };
        Ok(Manager {
            endpoint: Endpoint {
                address: bound,
                authkey: Some(authkey.as_bytes().to_vec()),
            },
            process: Some(process),
            stopped: AtomicBool::new(false),
        })
    }
}

/// What a server process started by [`ManagerBuilder::start_with`] receives: the
/// address and key to serve on, and the way to report that it listens.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ServerProcess {
    ready: Connection,
    address: WireAddr,
    authkey: Vec<u8>,
}

impl fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerProcess")
            .field("address", &Address::from(&self.address))
            .finish()
    }
}

impl ServerProcess {
    /// Builds the server (`configure` registers the type ids on a builder that already
    /// has the address and key), tells the parent it listens, and serves until
    /// `shutdown`. A bind failure is reported to the parent's `start_with`.
    pub fn serve(self, configure: impl FnOnce(ServerBuilder) -> ServerBuilder) {
        let builder = Server::builder(Address::from(&self.address))
            .authkey(AuthKey::new(self.authkey.clone()));
        let server = match configure(builder).bind() {
            Ok(s) => s,
            Err(e) => {
                let _ = self
                    .ready
                    .send(&std::result::Result::<WireAddr, String>::Err(e.to_string()));
                return;
            }
        };
        let bound = WireAddr::from(server.address());
        if self
            .ready
            .send(&std::result::Result::<WireAddr, String>::Ok(bound))
            .is_err()
        {
            return;
        }
        drop(self.ready);
        let _ = server.serve_forever();
    }
}

/// The default server process: CPython's `SyncManager` type ids.
fn sync_manager_process(p: ServerProcess) {
    p.serve(ServerBuilder::sync_manager_types);
}

fn wait_ready(conn: &Connection, process: &Process) -> Result<WireAddr> {
    if !conn.poll(Some(START_TIMEOUT))? {
        return Err(Error::timeout());
    }
    match conn.recv::<std::result::Result<WireAddr, String>>() {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(msg)) => Err(Error::process(format!(
            "the manager could not start: {msg}"
        ))),
        Err(Error::Eof) => {
            let _ = process.join_timeout(STOP_TIMEOUT);
            Err(Error::process(format!(
                "the manager process ended before listening ({})",
                process
                    .exit_status()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "still running".into())
            )))
        }
        Err(e) => Err(e),
    }
}

impl Manager {
    /// Starts a server process with CPython's `SyncManager` type ids on a private
    /// address with a random key (Python's `multiprocessing.Manager()`).
    pub fn start() -> Result<Manager> {
        Manager::builder().start()
    }

    /// A builder for a started manager.
    pub fn builder() -> ManagerBuilder {
        ManagerBuilder::default()
    }

    /// Connects to a running manager (Rust or CPython) at `address` (Python's
    /// `BaseManager(address, authkey).connect()`); checks the key with a `dummy`
    /// request. A wrong key is [`Error::Authentication`].
    pub fn connect(address: impl ToAddress, authkey: impl Into<AuthKey>) -> Result<Manager> {
        let address = address.to_address()?;
        let endpoint = Endpoint {
            address: WireAddr::from(&address),
            authkey: Some(authkey.into().as_bytes().to_vec()),
        };
        endpoint.control("dummy", &[], &[])?;
        Ok(Manager {
            endpoint,
            process: None,
            stopped: AtomicBool::new(false),
        })
    }

    /// The server's address.
    pub fn address(&self) -> Address {
        Address::from(&self.endpoint.address)
    }

    /// The key clients must use.
    pub fn authkey(&self) -> Option<AuthKey> {
        self.endpoint.authkey.clone().map(AuthKey::new)
    }

    /// The server process, when this handle started it.
    pub fn process(&self) -> Option<&Process> {
        self.process.as_ref()
    }

    /// Creates an object of any registered type id with positional `args` (a tuple of
    /// serde values, `()` for none) and keyword arguments, and returns its untyped proxy.
    pub fn create(
        &self,
        typeid: &str,
        args: impl Serialize,
        kwargs: &[(&str, Value)],
    ) -> Result<Proxy> {
        let args = match to_value(&args)? {
            Value::Tuple(v) => v,
            Value::None => Vec::new(),
            other => vec![other],
        };
        let kwargs: Vec<(String, Value)> = kwargs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.endpoint.create(typeid, args, &kwargs)
    }

    /// A typed proxy for a type id registered on the server, created with no arguments:
    /// Python's `m.get_jobs()` after `register('get_jobs')`. With a type id whose factory
    /// hands out one object (see [`ServerBuilder::share`]), every client gets that same
    /// object.
    ///
    /// ```
    /// use multiprocess::managers::{objects::Queue, Manager, QueueProxy, Server};
    /// use std::sync::Arc;
    /// let server = Server::builder("127.0.0.1:0")
    ///     .authkey("k")
    ///     .share("get_jobs", Arc::new(Queue::new(0)))
    ///     .bind()?;
    /// let address = server.address().clone();
    /// let stop = server.stop_handle();
    /// let t = std::thread::spawn(move || server.serve_forever());
    /// let a = Manager::connect(address.clone(), "k")?;
    /// let b = Manager::connect(address, "k")?;
    /// a.get::<QueueProxy<u64>>("get_jobs")?.put(7)?;
    /// assert_eq!(b.get::<QueueProxy<u64>>("get_jobs")?.get()?, 7);
    /// stop.stop();
    /// t.join().unwrap()?;
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ///
    /// # Errors
    /// The server's error for an unknown type id; connection errors.
    pub fn get<P: FromProxy>(&self, typeid: &str) -> Result<P> {
        Ok(P::from_proxy(self.create(typeid, (), &[])?))
    }

    /// A new empty `dict`.
    pub fn dict<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned>(
        &self,
    ) -> Result<DictProxy<K, V>> {
        Ok(DictProxy::from_proxy(self.create("dict", (), &[])?))
    }

    /// A new empty `list`.
    pub fn list<T: Serialize + DeserializeOwned>(&self) -> Result<ListProxy<T>> {
        Ok(ListProxy::from_proxy(self.create("list", (), &[])?))
    }

    /// A new unbounded `Queue`.
    #[doc(alias = "Queue")]
    pub fn queue<T: Serialize + DeserializeOwned>(&self) -> Result<QueueProxy<T>> {
        Ok(QueueProxy::from_proxy(self.create("Queue", (), &[])?))
    }

    /// A new `Queue` holding at most `maxsize` items (0: unbounded).
    pub fn bounded_queue<T: Serialize + DeserializeOwned>(
        &self,
        maxsize: usize,
    ) -> Result<QueueProxy<T>> {
        Ok(QueueProxy::from_proxy(self.create(
            "Queue",
            (maxsize,),
            &[],
        )?))
    }

    /// A new `JoinableQueue` (with `task_done`/`join`).
    #[doc(alias = "JoinableQueue")]
    pub fn joinable_queue<T: Serialize + DeserializeOwned>(&self) -> Result<QueueProxy<T>> {
        Ok(QueueProxy::from_proxy(self.create(
            "JoinableQueue",
            (),
            &[],
        )?))
    }

    /// A new `Value` holding `initial`.
    #[doc(alias = "Value")]
    pub fn value<T: Serialize + DeserializeOwned>(&self, initial: &T) -> Result<ValueProxy<T>> {
        let v = to_value(initial)?;
        let code = match v {
            Value::I64(_) | Value::Bool(_) => "q",
            Value::F64(_) => "d",
            _ => "O",
        };
        Ok(ValueProxy::from_proxy(self.create(
            "Value",
            (code, initial),
            &[],
        )?))
    }

    /// A new empty `Namespace`.
    #[doc(alias = "Namespace")]
    pub fn namespace(&self) -> Result<NamespaceProxy> {
        Ok(NamespaceProxy::from_proxy(self.create(
            "Namespace",
            (),
            &[],
        )?))
    }

    /// A new `Lock`.
    #[doc(alias = "Lock")]
    pub fn lock(&self) -> Result<LockProxy> {
        Ok(LockProxy::from_proxy(self.create("Lock", (), &[])?))
    }

    /// A new `RLock` (owned by the proxy that acquires it).
    #[doc(alias = "RLock")]
    pub fn rlock(&self) -> Result<LockProxy> {
        Ok(LockProxy::from_proxy(self.create("RLock", (), &[])?))
    }

    /// A new `Semaphore(value)`.
    #[doc(alias = "Semaphore")]
    pub fn semaphore(&self, value: usize) -> Result<LockProxy> {
        Ok(LockProxy::from_proxy(self.create(
            "Semaphore",
            (value,),
            &[],
        )?))
    }

    /// A new `BoundedSemaphore(value)`.
    #[doc(alias = "BoundedSemaphore")]
    pub fn bounded_semaphore(&self, value: usize) -> Result<LockProxy> {
        Ok(LockProxy::from_proxy(self.create(
            "BoundedSemaphore",
            (value,),
            &[],
        )?))
    }

    /// A new `Event`.
    #[doc(alias = "Event")]
    pub fn event(&self) -> Result<EventProxy> {
        Ok(EventProxy::from_proxy(self.create("Event", (), &[])?))
    }

    /// A new `Condition`.
    #[doc(alias = "Condition")]
    pub fn condition(&self) -> Result<ConditionProxy> {
        Ok(ConditionProxy::from_proxy(self.create(
            "Condition",
            (),
            &[],
        )?))
    }

    /// A new `Barrier(parties)`.
    #[doc(alias = "Barrier")]
    pub fn barrier(&self, parties: usize) -> Result<BarrierProxy> {
        Ok(BarrierProxy::from_proxy(self.create(
            "Barrier",
            (parties,),
            &[],
        )?))
    }

    /// The number of objects the server holds (Python's private
    /// `_number_of_objects`).
    #[doc(alias = "_number_of_objects")]
    pub fn number_of_objects(&self) -> Result<usize> {
        match self.endpoint.control("number_of_objects", &[], &[])? {
            Value::I64(n) => Ok(n.max(0) as usize),
            _ => Err(Error::protocol("number_of_objects returned a non-int")),
        }
    }

    /// Stops the server (`shutdown` request) and, if this handle started it, waits for
    /// its process to exit (killing it after 5 s). Every object is gone afterwards;
    /// proxies' calls fail.
    pub fn shutdown(&self) -> Result<()> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let sent = self.endpoint.control("shutdown", &[], &[]);
        if let Some(p) = &self.process {
            if !p.join_timeout(STOP_TIMEOUT)? {
                p.kill()?;
                p.join()?;
            }
        }
        match sent {
            // The server may close before its reply is read: that is still a shutdown.
            Err(Error::Eof) if self.process.is_some() => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if self.process.is_some() {
            let _ = self.shutdown();
        }
    }
}
