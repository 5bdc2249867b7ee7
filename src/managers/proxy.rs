//! Client side: connecting to a manager, and proxies to its objects.

use super::objects::repr;
use super::wire::{self, Reply};
use crate::connection::{Address, AuthKey, Client, Connection};
use crate::error::{Error, Result};
use crate::queues::PutError;
use crate::reduction::pickle::Value;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long connecting (and the handshake) to a manager may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// [`Address`] in a form that travels through serde.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WireAddr {
    Inet(String, u16),
    Unix(PathBuf),
    Abstract(Vec<u8>),
}

impl From<&Address> for WireAddr {
    fn from(a: &Address) -> WireAddr {
        match a {
            Address::Inet { host, port } => WireAddr::Inet(host.clone(), *port),
            Address::Unix(p) => WireAddr::Unix(p.clone()),
            Address::Abstract(n) => WireAddr::Abstract(n.clone()),
        }
    }
}

impl From<&WireAddr> for Address {
    fn from(a: &WireAddr) -> Address {
        match a {
            WireAddr::Inet(h, p) => Address::Inet {
                host: h.clone(),
                port: *p,
            },
            WireAddr::Unix(p) => Address::Unix(p.clone()),
            WireAddr::Abstract(n) => Address::Abstract(n.clone()),
        }
    }
}

/// Where a manager is and the key to reach it.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    pub(crate) address: WireAddr,
    pub(crate) authkey: Option<Vec<u8>>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Address::from(&self.address))
    }
}

pub(crate) fn to_value<T: Serialize + ?Sized>(v: &T) -> Result<Value> {
    serde_pickle::to_value(v).map_err(Error::serialization)
}

std::thread_local! {
    /// Set while a value from a manager reply is decoded: a proxy inside it is a copy of
    /// one stored on the server (which keeps the stored reference), so the copy takes a
    /// reference of its own.
    static FROM_REPLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Decodes a value a manager returned as a copy (a proxy inside takes a reference).
pub(crate) fn from_value<T: DeserializeOwned>(v: Value) -> Result<T> {
    decode_reply_value(v, true)
}

/// Decodes a value a manager handed over (a queue's `get`): a proxy inside takes over
/// the reference the stored copy carried.
fn from_value_moved<T: DeserializeOwned>(v: Value) -> Result<T> {
    decode_reply_value(v, false)
}

fn decode_reply_value<T: DeserializeOwned>(v: Value, copy: bool) -> Result<T> {
    let was = FROM_REPLY.with(|f| f.replace(copy));
    let r = serde_pickle::from_value(v).map_err(Error::serialization);
    FROM_REPLY.with(|f| f.set(was));
    r
}

fn remote_error(module: &str, name: &str, args: &[Value]) -> Error {
    let _ = module;
    Error::Remote {
        exception: name.to_string(),
        message: match args {
            [] => String::new(),
            [Value::String(s)] if name != "KeyError" => s.clone(),
            [one] => repr(one),
            more => repr(&Value::Tuple(more.to_vec())),
        },
    }
}

/// Whether `e` is the exception `name` raised by the managed object.
pub(crate) fn is_exception(e: &Error, name: &str) -> bool {
    matches!(e, Error::Remote { exception, .. } if exception == name)
}

impl Endpoint {
    pub(crate) fn connect(&self) -> Result<Connection> {
        Client::new(Address::from(&self.address))
            .authkey_opt(self.authkey.clone().map(AuthKey::new))
            .connect_timeout(CONNECT_TIMEOUT)
            .handshake_timeout(CONNECT_TIMEOUT)
            .connect()
    }

    fn exchange(conn: &Connection, request: &[u8]) -> Result<Reply> {
        conn.send_bytes(request)?;
        wire::decode_reply(&conn.recv_bytes()?)
    }

    /// One control request on its own connection (`create`, `incref`…).
    pub(crate) fn control(
        &self,
        method: &str,
        args: &[Value],
        kwargs: &[(String, Value)],
    ) -> Result<Value> {
        let conn = self.connect()?;
        match Self::exchange(&conn, &wire::encode_request(None, method, args, kwargs))? {
            Reply::Return(v) => Ok(v),
            Reply::Error { module, name, args } => Err(remote_error(&module, &name, &args)),
            Reply::Traceback(t) => Err(Error::Remote {
                exception: "RemoteError".into(),
                message: t,
            }),
            Reply::Proxy { .. } => Err(Error::protocol(
                "unexpected #PROXY reply to a control request",
            )),
        }
    }

    /// Creates an object of `typeid` and returns a proxy to it.
    pub(crate) fn create(
        &self,
        typeid: &str,
        args: Vec<Value>,
        kwargs: &[(String, Value)],
    ) -> Result<Proxy> {
        let mut all = Vec::with_capacity(args.len() + 1);
        all.push(Value::String(typeid.to_string()));
        all.extend(args);
        let v = self.control("create", &all, kwargs)?;
        let ident = match v {
            Value::Tuple(t) | Value::List(t) if !t.is_empty() => match &t[0] {
                Value::String(s) => s.clone(),
                _ => return Err(Error::protocol("create returned a non-str id")),
            },
            _ => return Err(Error::protocol("create returned an unexpected value")),
        };
        Proxy::adopt(self.clone(), typeid.to_string(), ident)
    }
}

/// A proxy for any object on a manager server: calls methods by name with plain data
/// (Python's `BaseProxy` / `AutoProxy`). The typed proxies ([`DictProxy`]…) wrap one.
///
/// **Connection.** Each proxy keeps its own method-call connection, opened when it is
/// made. Calls from several threads through the same proxy are serialised (and a
/// blocking call such as [`QueueProxy::get`] holds the others); clone the proxy to give
/// a thread its own connection.
///
/// **Lifetime.** The proxy holds one reference to its object. With a Rust server the
/// reference belongs to the proxy's connection, so the object is freed when the last
/// proxy is dropped *or its process dies*. With a CPython server, `Drop` sends
/// `decref` (a killed process leaks its references there, as with CPython proxies).
///
/// **Failures.** When the server process dies, a pending or later call fails at once
/// ([`Error::Eof`] or [`Error::Io`]); for a server on another machine, which can vanish
/// without closing the connection, bound each call with [`set_timeout`](Proxy::set_timeout).
///
/// **Travelling.** A proxy is `Serialize + Deserialize`: put it in [`Process`](crate::Process)
/// args, a queue or a connection message and it works in the receiving process. Each
/// serialized copy takes one reference on the server when it is serialized and hands it
/// to the proxy built from it; a copy that is never deserialized keeps the object
/// alive until the server stops. The serialized form carries the manager's address and
/// authkey (as CPython's proxies do when spawning): treat it as a secret.
#[doc(alias = "BaseProxy")]
#[doc(alias = "AutoProxy")]
pub struct Proxy {
    endpoint: Endpoint,
    typeid: String,
    ident: String,
    channel: Mutex<Option<Connection>>,
    /// Whether the server took our reference as owned by the channel (Rust server).
    owned_by_channel: bool,
    broken: Option<String>,
    /// Call timeout in milliseconds; 0 for none.
    timeout_ms: AtomicU64,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "<Proxy of {} object {} at {:?}>",
            self.typeid, self.ident, self.endpoint
        )
    }
}

impl Proxy {
    /// Opens a method-call channel for `ident` and asks the server to tie one of our
    /// references to it (`#ADOPT`); returns whether it did (Rust servers do, CPython
    /// ones answer with a traceback).
    fn open_channel(endpoint: &Endpoint, ident: &str) -> Result<(Connection, bool)> {
        let chan = endpoint.connect()?;
        let name = Value::String(format!(
            "{}|{}",
            crate::current_process().name(),
            std::process::id()
        ));
        match Endpoint::exchange(
            &chan,
            &wire::encode_request(None, "accept_connection", &[name], &[]),
        )? {
            Reply::Return(_) => {}
            other => {
                return Err(Error::protocol(format!(
                    "accept_connection failed: {other:?}"
                )))
            }
        }
        let owned = matches!(
            Endpoint::exchange(
                &chan,
                &wire::encode_request(Some(ident), "#ADOPT", &[], &[])
            )?,
            Reply::Return(_)
        );
        Ok((chan, owned))
    }

    /// Builds a proxy that takes over one reference the caller holds for `ident`.
    pub(crate) fn adopt(endpoint: Endpoint, typeid: String, ident: String) -> Result<Proxy> {
        match Self::open_channel(&endpoint, &ident) {
            Ok((chan, owned)) => Ok(Proxy {
                endpoint,
                typeid,
                ident,
                channel: Mutex::new(Some(chan)),
                owned_by_channel: owned,
                broken: None,
                timeout_ms: AtomicU64::new(0),
            }),
            Err(e) => {
                let _ = endpoint.control("decref", &[Value::String(ident.clone())], &[]);
                Err(e)
            }
        }
    }

    /// Sets how long a method call may wait for its reply (`None`: for ever, the
    /// default). A call that runs out of time is [`Error::Timeout`]; the proxy then
    /// replaces its connection (the server abandons the call, so a timed-out
    /// `Queue.get` consumes no item) and stays usable. Use it for servers on other
    /// machines, which can vanish without closing the connection.
    pub fn set_timeout(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |t| (t.as_millis() as u64).max(1));
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// The call timeout (see [`set_timeout`](Self::set_timeout)).
    pub fn timeout(&self) -> Option<Duration> {
        match self.timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// After a timed-out call: a fresh channel holding a reference of its own, then the
    /// old one is closed (which releases the old reference on a Rust server).
    fn replace_channel(&self, chan: &mut Option<Connection>) -> Result<()> {
        if self.owned_by_channel {
            self.endpoint
                .control("incref", &[Value::String(self.ident.clone())], &[])?;
        }
        match Self::open_channel(&self.endpoint, &self.ident) {
            Ok((new, _)) => {
                *chan = Some(new);
                Ok(())
            }
            Err(e) => {
                if self.owned_by_channel {
                    let _ =
                        self.endpoint
                            .control("decref", &[Value::String(self.ident.clone())], &[]);
                }
                *chan = None;
                Err(e)
            }
        }
    }

    /// The object's id on the server (CPython's `token.id`).
    pub fn ident(&self) -> &str {
        &self.ident
    }

    /// The object's type id (`dict`, `Queue`…).
    pub fn typeid(&self) -> &str {
        &self.typeid
    }

    /// The manager's address.
    pub fn address(&self) -> Address {
        Address::from(&self.endpoint.address)
    }

    /// Calls `method` with positional `args` and keyword `kwargs` given as plain values,
    /// and returns the result as a [`Value`]. An exception raised by the object is
    /// [`Error::Remote`]; a method whose result is a new shared object (a dict's
    /// `__iter__`) gives that object's proxy in [`Called::Proxy`].
    pub fn call_raw(
        &self,
        method: &str,
        args: &[Value],
        kwargs: &[(String, Value)],
    ) -> Result<Called> {
        if let Some(b) = &self.broken {
            return Err(Error::process(b.clone()));
        }
        let request = wire::encode_request(Some(&self.ident), method, args, kwargs);
        let reply = {
            let mut chan = lock(&self.channel);
            let conn = chan.as_ref().ok_or(Error::Closed("manager proxy"))?;
            conn.send_bytes(&request)?;
            if let Some(t) = self.timeout() {
                if !conn.poll(Some(t))? {
                    // The reply may still come: this channel is out of step for good.
                    self.replace_channel(&mut chan)?;
                    return Err(Error::timeout());
                }
            }
            wire::decode_reply(&conn.recv_bytes()?)?
        };
        match reply {
            Reply::Return(v) => Ok(Called::Value(v)),
            Reply::Error { module, name, args } => Err(remote_error(&module, &name, &args)),
            Reply::Traceback(t) => Err(Error::Remote {
                exception: "RemoteError".into(),
                message: t,
            }),
            Reply::Proxy { typeid, ident, .. } => Ok(Called::Proxy(Box::new(Proxy::adopt(
                self.endpoint.clone(),
                typeid,
                ident,
            )?))),
        }
    }

    /// Calls `method` with `args` — a tuple of serde values, `()` for none — and decodes
    /// the result as `R` (Python's `proxy._callmethod(method, args)`).
    ///
    /// ```
    /// use multiprocess::managers::Manager;
    /// let manager = Manager::start()?;
    /// let list = manager.create("list", (), &[])?;
    /// list.call::<()>("append", (7,))?;
    /// list.call::<()>("append", (9,))?;
    /// assert_eq!(list.call::<i64>("__len__", ())?, 2);
    /// assert_eq!(list.call::<i64>("index", (9,))?, 1);
    /// manager.shutdown()?;
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    #[doc(alias = "_callmethod")]
    pub fn call<R: DeserializeOwned>(&self, method: &str, args: impl Serialize) -> Result<R> {
        let args = args_of(&args)?;
        match self.call_raw(method, &args, &[])? {
            Called::Value(v) => from_value(v),
            Called::Proxy(_) => Err(Error::protocol(format!(
                "{method} returned a shared object; use call_raw"
            ))),
        }
    }

    /// A copy of the object's value (`#GETVALUE`, Python's `proxy._getvalue()`).
    #[doc(alias = "_getvalue")]
    pub fn get_value<R: DeserializeOwned>(&self) -> Result<R> {
        match self.call_raw("#GETVALUE", &[], &[])? {
            Called::Value(v) => from_value(v),
            Called::Proxy(_) => Err(Error::protocol("#GETVALUE returned a proxy")),
        }
    }

    /// Another proxy to the same object, with its own connection (takes a reference) and
    /// the same call timeout.
    pub fn try_clone(&self) -> Result<Proxy> {
        self.endpoint
            .control("incref", &[Value::String(self.ident.clone())], &[])?;
        let p = Proxy::adopt(
            self.endpoint.clone(),
            self.typeid.clone(),
            self.ident.clone(),
        )?;
        p.set_timeout(self.timeout());
        Ok(p)
    }
}

/// The result of [`Proxy::call_raw`].
#[derive(Debug)]
pub enum Called {
    /// A plain value.
    Value(Value),
    /// A new shared object.
    Proxy(Box<Proxy>),
}

fn args_of<A: Serialize + ?Sized>(args: &A) -> Result<Vec<Value>> {
    Ok(match to_value(args)? {
        Value::Tuple(v) => v,
        Value::None => Vec::new(),
        other => vec![other],
    })
}

impl Clone for Proxy {
    /// Like [`try_clone`](Proxy::try_clone); if the server cannot be reached, the clone's
    /// calls fail with that error.
    fn clone(&self) -> Proxy {
        self.try_clone().unwrap_or_else(|e| Proxy {
            endpoint: self.endpoint.clone(),
            typeid: self.typeid.clone(),
            ident: self.ident.clone(),
            channel: Mutex::new(None),
            owned_by_channel: true,
            broken: Some(format!("could not clone the proxy: {e}")),
            timeout_ms: AtomicU64::new(0),
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let chan = lock(&self.channel).take();
        drop(chan);
        if !self.owned_by_channel {
            let _ = self
                .endpoint
                .control("decref", &[Value::String(self.ident.clone())], &[]);
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ProxyWire {
    endpoint: Endpoint,
    typeid: String,
    ident: String,
}

impl Serialize for Proxy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        // The reference this copy carries to whoever deserializes it.
        self.endpoint
            .control("incref", &[Value::String(self.ident.clone())], &[])
            .map_err(serde::ser::Error::custom)?;
        ProxyWire {
            endpoint: self.endpoint.clone(),
            typeid: self.typeid.clone(),
            ident: self.ident.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Proxy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Proxy, D::Error> {
        let w = ProxyWire::deserialize(d)?;
        if FROM_REPLY.with(|f| f.get()) {
            w.endpoint
                .control("incref", &[Value::String(w.ident.clone())], &[])
                .map_err(serde::de::Error::custom)?;
        }
        Proxy::adopt(w.endpoint, w.typeid, w.ident).map_err(serde::de::Error::custom)
    }
}

/// A proxy type built from an untyped [`Proxy`]: every typed proxy, and `Proxy` itself.
/// [`Manager::get`](super::Manager::get) returns any of them for a registered type id.
pub trait FromProxy: Sized {
    /// Wraps `proxy`.
    fn from_proxy(proxy: Proxy) -> Self;
}

impl FromProxy for Proxy {
    fn from_proxy(proxy: Proxy) -> Self {
        proxy
    }
}

macro_rules! typed_proxy {
    ($(#[$m:meta])* $name:ident < $($t:ident),* >) => {
        $(#[$m])*
        pub struct $name<$($t),*> {
            inner: Proxy,
            _t: PhantomData<fn() -> ($($t,)*)>,
        }

        impl<$($t),*> $name<$($t),*> {
            /// Wraps an untyped proxy (for instance of a type id registered on the
            /// server); the methods fail with the server's error if the object behind
            /// it is of another kind.
            pub fn from_proxy(inner: Proxy) -> Self {
                $name { inner, _t: PhantomData }
            }

            /// The untyped proxy underneath.
            pub fn proxy(&self) -> &Proxy {
                &self.inner
            }
        }

        impl<$($t),*> FromProxy for $name<$($t),*> {
            fn from_proxy(inner: Proxy) -> Self {
                $name { inner, _t: PhantomData }
            }
        }

        impl<$($t),*> Clone for $name<$($t),*> {
            /// Another proxy to the same object, with its own connection.
            fn clone(&self) -> Self {
                Self::from_proxy(self.inner.clone())
            }
        }

        impl<$($t),*> fmt::Debug for $name<$($t),*> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.inner.fmt(f)
            }
        }

        impl<$($t),*> Serialize for $name<$($t),*> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                self.inner.serialize(s)
            }
        }

        impl<'de, $($t),*> Deserialize<'de> for $name<$($t),*> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                Ok(Self::from_proxy(Proxy::deserialize(d)?))
            }
        }
    };
}

typed_proxy!(
    /// A `dict` on a manager (Python's `DictProxy`), with keys `K` and values `V`.
    ///
    /// Every method is one round trip to the server and is atomic there. A
    /// read-modify-write made of two calls is **not** atomic — see the
    /// [module docs](super#the-lost-update-trap) for the idiom.
    ///
    /// ```
    /// use multiprocess::managers::Manager;
    /// let manager = Manager::start()?;
    /// let d = manager.dict::<String, i64>()?;
    /// d.insert(&"a".to_string(), &1)?;
    /// assert_eq!(d.get(&"a".to_string())?, Some(1));
    /// assert_eq!(d.get(&"missing".to_string())?, None);
    /// assert_eq!(d.len()?, 1);
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    DictProxy<K, V>
);

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> DictProxy<K, V> {
    fn call<R: DeserializeOwned>(&self, method: &str, args: Vec<Value>) -> Result<R> {
        match self.inner.call_raw(method, &args, &[])? {
            Called::Value(v) => from_value(v),
            Called::Proxy(_) => Err(Error::protocol("unexpected proxy")),
        }
    }

    /// Sets `d[key] = value`.
    #[doc(alias = "__setitem__")]
    pub fn insert(&self, key: &K, value: &V) -> Result<()> {
        self.call("__setitem__", vec![to_value(key)?, to_value(value)?])
    }

    /// `d[key]`, or `None` when the key is missing (Python raises `KeyError`).
    #[doc(alias = "__getitem__")]
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        match self.call("__getitem__", vec![to_value(key)?]) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_exception(&e, "KeyError") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes `key` and returns its value, if it was there (`d.pop(key, None)`).
    #[doc(alias = "pop")]
    #[doc(alias = "__delitem__")]
    pub fn remove(&self, key: &K) -> Result<Option<V>> {
        match self.call("pop", vec![to_value(key)?]) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_exception(&e, "KeyError") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `key in d`.
    #[doc(alias = "__contains__")]
    pub fn contains_key(&self, key: &K) -> Result<bool> {
        self.call("__contains__", vec![to_value(key)?])
    }

    /// `len(d)`.
    #[doc(alias = "__len__")]
    pub fn len(&self) -> Result<usize> {
        self.call("__len__", vec![])
    }

    /// `len(d) == 0`.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// A copy of the keys.
    pub fn keys(&self) -> Result<Vec<K>> {
        self.call("keys", vec![])
    }

    /// A copy of the values.
    pub fn values(&self) -> Result<Vec<V>> {
        self.call("values", vec![])
    }

    /// A copy of the items (also what iterating a `DictProxy` in Python sees).
    pub fn items(&self) -> Result<Vec<(K, V)>> {
        self.call("items", vec![])
    }

    /// Removes every item.
    pub fn clear(&self) -> Result<()> {
        self.call("clear", vec![])
    }

    /// Sets many items in one call (`d.update(...)`).
    pub fn update<'a>(&self, items: impl IntoIterator<Item = (&'a K, &'a V)>) -> Result<()>
    where
        K: 'a,
        V: 'a,
    {
        let pairs = items
            .into_iter()
            .map(|(k, v)| Ok(Value::Tuple(vec![to_value(k)?, to_value(v)?])))
            .collect::<Result<Vec<_>>>()?;
        self.call("update", vec![Value::List(pairs)])
    }

    /// `d.setdefault(key, default)`: the value, inserting `default` first if missing —
    /// atomically on the server.
    pub fn setdefault(&self, key: &K, default: &V) -> Result<V> {
        self.call("setdefault", vec![to_value(key)?, to_value(default)?])
    }
}

typed_proxy!(
    /// A `list` on a manager (Python's `ListProxy`).
    ///
    /// ```
    /// use multiprocess::managers::Manager;
    /// let manager = Manager::start()?;
    /// let l = manager.list::<i32>()?;
    /// l.extend(&[3, 1, 2])?;
    /// l.sort()?;
    /// assert_eq!(l.to_vec()?, vec![1, 2, 3]);
    /// assert_eq!(l.get(-1)?, Some(3));
    /// assert_eq!(l.get(10)?, None);
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    ListProxy<T>
);

impl<T: Serialize + DeserializeOwned> ListProxy<T> {
    fn call<R: DeserializeOwned>(&self, method: &str, args: Vec<Value>) -> Result<R> {
        match self.inner.call_raw(method, &args, &[])? {
            Called::Value(v) => from_value(v),
            Called::Proxy(_) => Err(Error::protocol("unexpected proxy")),
        }
    }

    /// Appends an item.
    #[doc(alias = "append")]
    pub fn push(&self, item: &T) -> Result<()> {
        self.call("append", vec![to_value(item)?])
    }

    /// Appends many items (`l.extend(...)`, Python's `+=`).
    pub fn extend(&self, items: &[T]) -> Result<()> {
        self.call("extend", vec![to_value(items)?])
    }

    /// Removes and returns the last item, `None` if empty.
    pub fn pop(&self) -> Result<Option<T>> {
        match self.call("pop", vec![]) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_exception(&e, "IndexError") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Item `index` (negative counts from the end), `None` when out of range.
    #[doc(alias = "__getitem__")]
    pub fn get(&self, index: isize) -> Result<Option<T>> {
        match self.call("__getitem__", vec![Value::I64(index as i64)]) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_exception(&e, "IndexError") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets item `index`; out of range is `Error::Remote` with `IndexError`.
    #[doc(alias = "__setitem__")]
    pub fn set(&self, index: isize, item: &T) -> Result<()> {
        self.call(
            "__setitem__",
            vec![Value::I64(index as i64), to_value(item)?],
        )
    }

    /// Deletes item `index`; out of range is `Error::Remote` with `IndexError`.
    #[doc(alias = "__delitem__")]
    pub fn delete(&self, index: isize) -> Result<()> {
        self.call("__delitem__", vec![Value::I64(index as i64)])
    }

    /// Inserts before `index` (clamped, as in Python).
    pub fn insert(&self, index: isize, item: &T) -> Result<()> {
        self.call("insert", vec![Value::I64(index as i64), to_value(item)?])
    }

    /// Removes the first item equal to `item`; false if there was none.
    pub fn remove(&self, item: &T) -> Result<bool> {
        match self.call::<()>("remove", vec![to_value(item)?]) {
            Ok(()) => Ok(true),
            Err(e) if is_exception(&e, "ValueError") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Position of the first item equal to `item`.
    pub fn index(&self, item: &T) -> Result<Option<usize>> {
        match self.call("index", vec![to_value(item)?]) {
            Ok(i) => Ok(Some(i)),
            Err(e) if is_exception(&e, "ValueError") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// How many items equal `item`.
    pub fn count(&self, item: &T) -> Result<usize> {
        self.call("count", vec![to_value(item)?])
    }

    /// `item in l`.
    #[doc(alias = "__contains__")]
    pub fn contains(&self, item: &T) -> Result<bool> {
        self.call("__contains__", vec![to_value(item)?])
    }

    /// `len(l)`.
    #[doc(alias = "__len__")]
    pub fn len(&self) -> Result<usize> {
        self.call("__len__", vec![])
    }

    /// `len(l) == 0`.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reverses in place.
    pub fn reverse(&self) -> Result<()> {
        self.call("reverse", vec![])
    }

    /// Sorts in place (Python's ordering of the items).
    pub fn sort(&self) -> Result<()> {
        self.call("sort", vec![])
    }

    /// A copy of the whole list (slice it locally: slices are not sent to managers).
    #[doc(alias = "_getvalue")]
    pub fn to_vec(&self) -> Result<Vec<T>> {
        self.inner.get_value()
    }
}

typed_proxy!(
    /// A `queue.Queue` on a manager (`Manager().Queue()` / `JoinableQueue()`).
    ///
    /// ```
    /// use multiprocess::managers::Manager;
    /// use std::time::Duration;
    /// let manager = Manager::start()?;
    /// let q = manager.queue::<String>()?;
    /// q.put("job".to_string())?;
    /// assert_eq!(q.get()?, "job");
    /// assert!(matches!(q.try_get(), Err(multiprocess::Error::Empty)));
    /// assert!(matches!(
    ///     q.get_timeout(Duration::from_millis(10)),
    ///     Err(multiprocess::Error::Empty)
    /// ));
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    QueueProxy<T>
);

impl<T: Serialize + DeserializeOwned> QueueProxy<T> {
    fn call_kw<R: DeserializeOwned>(&self, method: &str, args: Vec<Value>) -> Result<R> {
        match self.inner.call_raw(method, &args, &[])? {
            Called::Value(v) => from_value_moved(v),
            Called::Proxy(_) => Err(Error::protocol("unexpected proxy")),
        }
    }

    /// Puts an item, waiting while a bounded queue is full.
    pub fn put(&self, item: T) -> Result<()> {
        self.call_kw("put", vec![to_value(&item)?])
    }

    /// Puts an item if there is room now, as [`Queue::try_put`](crate::queues::Queue::try_put).
    ///
    /// # Errors
    /// [`PutError::Full`] hands the item back when a bounded queue is full;
    /// [`PutError::Failed`] for anything else (the server is gone, the item cannot be
    /// encoded).
    #[doc(alias = "put_nowait")]
    pub fn try_put(&self, item: T) -> std::result::Result<(), PutError<T>> {
        let v = to_value(&item).map_err(PutError::Failed)?;
        match self.call_kw::<()>("put", vec![v, Value::Bool(false)]) {
            Ok(()) => Ok(()),
            Err(e) if is_exception(&e, "Full") => Err(PutError::Full(item)),
            Err(e) => Err(PutError::Failed(e)),
        }
    }

    /// Puts an item, waiting up to `timeout` for room, as
    /// [`Queue::put_timeout`](crate::queues::Queue::put_timeout).
    ///
    /// # Errors
    /// As [`try_put`](Self::try_put).
    pub fn put_timeout(&self, item: T, timeout: Duration) -> std::result::Result<(), PutError<T>> {
        let v = to_value(&item).map_err(PutError::Failed)?;
        let args = vec![v, Value::Bool(true), Value::F64(timeout.as_secs_f64())];
        match self.call_kw::<()>("put", args) {
            Ok(()) => Ok(()),
            Err(e) if is_exception(&e, "Full") => Err(PutError::Full(item)),
            Err(e) => Err(PutError::Failed(e)),
        }
    }

    /// Takes an item, waiting for one.
    pub fn get(&self) -> Result<T> {
        self.call_kw("get", vec![])
    }

    /// Takes an item if there is one now, as [`Queue::try_get`](crate::queues::Queue::try_get).
    ///
    /// # Errors
    /// [`Error::Empty`] when there is none; other errors from the server or decoding.
    #[doc(alias = "get_nowait")]
    pub fn try_get(&self) -> Result<T> {
        match self.call_kw("get", vec![Value::Bool(false)]) {
            Err(e) if is_exception(&e, "Empty") => Err(Error::Empty),
            other => other,
        }
    }

    /// Takes an item, waiting up to `timeout`, as
    /// [`Queue::get_timeout`](crate::queues::Queue::get_timeout).
    ///
    /// # Errors
    /// [`Error::Empty`] if none came in time (Python's `queue.Empty`).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        match self.call_kw(
            "get",
            vec![Value::Bool(true), Value::F64(timeout.as_secs_f64())],
        ) {
            Err(e) if is_exception(&e, "Empty") => Err(Error::Empty),
            other => other,
        }
    }

    /// The number of items (Python's `qsize`).
    #[doc(alias = "qsize")]
    pub fn len(&self) -> Result<usize> {
        self.call_kw("qsize", vec![])
    }

    /// Whether it is empty.
    #[doc(alias = "empty")]
    pub fn is_empty(&self) -> Result<bool> {
        self.call_kw("empty", vec![])
    }

    /// Whether a bounded queue is full.
    #[doc(alias = "full")]
    pub fn is_full(&self) -> Result<bool> {
        self.call_kw("full", vec![])
    }

    /// Marks one taken item as processed (`JoinableQueue.task_done`).
    pub fn task_done(&self) -> Result<()> {
        self.call_kw("task_done", vec![])
    }

    /// Waits until every item put has been marked done.
    pub fn join(&self) -> Result<()> {
        self.call_kw("join", vec![])
    }
}

typed_proxy!(
    /// A `Value` on a manager (Python's `ValueProxy`): `get` and `set`.
    ///
    /// `v.set(&(v.get()? + 1))` is two calls, not atomic: guard it with a manager
    /// [`lock`](super::Manager::lock) when several processes update it.
    ValueProxy<T>
);

impl<T: Serialize + DeserializeOwned> ValueProxy<T> {
    /// The current value.
    pub fn get(&self) -> Result<T> {
        self.inner.call("get", ())
    }

    /// Replaces the value.
    pub fn set(&self, value: &T) -> Result<()> {
        let v = to_value(value)?;
        self.inner.call_raw("set", &[v], &[]).map(|_| ())
    }
}

typed_proxy!(
    /// A `Namespace` on a manager: named attributes of any plain type.
    ///
    /// ```
    /// use multiprocess::managers::Manager;
    /// let manager = Manager::start()?;
    /// let ns = manager.namespace()?;
    /// ns.set("x", &10)?;
    /// assert_eq!(ns.get::<i32>("x")?, 10);
    /// assert_eq!(ns.try_get::<i32>("y")?, None);
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    NamespaceProxy<>
);

impl NamespaceProxy {
    /// Attribute `name`; a missing one is `Error::Remote` with `AttributeError`.
    #[doc(alias = "__getattribute__")]
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        self.inner.call("__getattribute__", (name,))
    }

    /// Attribute `name`, `None` if missing.
    pub fn try_get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        match self.get(name) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_exception(&e, "AttributeError") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets attribute `name`.
    #[doc(alias = "__setattr__")]
    pub fn set<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        let v = to_value(value)?;
        self.inner
            .call_raw("__setattr__", &[Value::String(name.into()), v], &[])
            .map(|_| ())
    }

    /// Deletes attribute `name`; false if it did not exist.
    #[doc(alias = "__delattr__")]
    pub fn remove(&self, name: &str) -> Result<bool> {
        match self.inner.call::<()>("__delattr__", (name,)) {
            Ok(()) => Ok(true),
            Err(e) if is_exception(&e, "AttributeError") => Ok(false),
            Err(e) => Err(e),
        }
    }
}

typed_proxy!(
    /// A `Lock`, `RLock`, `Semaphore` or `BoundedSemaphore` on a manager.
    ///
    /// An `RLock` is owned by the proxy (its connection): another clone of the proxy is
    /// another owner. What a proxy holds is released when its connection closes — the
    /// proxy is dropped or its process dies — so a killed process cannot leave a lock
    /// held (CPython's would stay held). Hand a held lock to another process only by
    /// keeping the acquiring proxy alive until it is released.
    ///
    /// ```
    /// use multiprocess::managers::Manager;
    /// let manager = Manager::start()?;
    /// let lock = manager.lock()?;
    /// {
    ///     let _held = lock.guard()?;
    ///     assert!(!lock.clone().try_acquire()?);
    /// }
    /// assert!(lock.try_acquire()?);
    /// lock.release()?;
    /// # Ok::<(), multiprocess::Error>(())
    /// ```
    LockProxy<>
);

impl LockProxy {
    /// Waits until acquired.
    pub fn acquire(&self) -> Result<()> {
        self.inner.call::<bool>("acquire", ()).map(|_| ())
    }

    /// Acquires if free now.
    pub fn try_acquire(&self) -> Result<bool> {
        self.inner.call("acquire", (false,))
    }

    /// Waits up to `timeout`; false if not acquired.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        self.inner.call("acquire", (true, timeout.as_secs_f64()))
    }

    /// Releases; releasing an unlocked `Lock` is `Error::Remote` with `RuntimeError`.
    pub fn release(&self) -> Result<()> {
        self.inner.call("release", ())
    }

    /// Acquires and returns a guard that releases on drop.
    pub fn guard(&self) -> Result<ProxyLockGuard<'_>> {
        self.acquire()?;
        Ok(ProxyLockGuard { lock: self })
    }
}

/// Releases a [`LockProxy`] when dropped.
#[derive(Debug)]
#[must_use]
pub struct ProxyLockGuard<'a> {
    lock: &'a LockProxy,
}

impl Drop for ProxyLockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.lock.release();
    }
}

typed_proxy!(
    /// An `Event` on a manager.
    EventProxy<>
);

impl EventProxy {
    /// Sets the flag and wakes every waiter.
    pub fn set(&self) -> Result<()> {
        self.inner.call("set", ())
    }
    /// Clears the flag.
    pub fn clear(&self) -> Result<()> {
        self.inner.call("clear", ())
    }
    /// Whether the flag is set.
    pub fn is_set(&self) -> Result<bool> {
        self.inner.call("is_set", ())
    }
    /// Waits until the flag is set.
    pub fn wait(&self) -> Result<()> {
        self.inner.call::<bool>("wait", ()).map(|_| ())
    }
    /// Waits up to `timeout`; returns the flag.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool> {
        self.inner.call("wait", (timeout.as_secs_f64(),))
    }
}

typed_proxy!(
    /// A `Condition` on a manager (its lock is re-entrant, owned by this proxy).
    ConditionProxy<>
);

impl ConditionProxy {
    /// Acquires the underlying lock.
    pub fn acquire(&self) -> Result<()> {
        self.inner.call::<bool>("acquire", ()).map(|_| ())
    }
    /// Releases the underlying lock.
    pub fn release(&self) -> Result<()> {
        self.inner.call("release", ())
    }
    /// Releases the lock, waits for a notify, re-acquires.
    pub fn wait(&self) -> Result<()> {
        self.inner.call::<bool>("wait", ()).map(|_| ())
    }
    /// As [`wait`](Self::wait), up to `timeout`; false if not notified in time.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool> {
        self.inner.call("wait", (timeout.as_secs_f64(),))
    }
    /// Wakes up to `n` waiters.
    pub fn notify(&self, n: usize) -> Result<()> {
        self.inner.call("notify", (n,))
    }
    /// Wakes every waiter.
    pub fn notify_all(&self) -> Result<()> {
        self.inner.call("notify_all", ())
    }
}

typed_proxy!(
    /// A `Barrier` on a manager.
    BarrierProxy<>
);

impl BarrierProxy {
    /// Waits for all parties; returns this caller's arrival index. A broken barrier is
    /// `Error::Remote` with `BrokenBarrierError`.
    pub fn wait(&self) -> Result<usize> {
        self.inner.call("wait", ())
    }
    /// As [`wait`](Self::wait), breaking the barrier after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<usize> {
        self.inner.call("wait", (timeout.as_secs_f64(),))
    }
    /// Breaks the barrier.
    pub fn abort(&self) -> Result<()> {
        self.inner.call("abort", ())
    }
    /// Resets it to the initial state.
    pub fn reset(&self) -> Result<()> {
        self.inner.call("reset", ())
    }
    /// The number of parties.
    pub fn parties(&self) -> Result<usize> {
        self.inner.call("__getattribute__", ("parties",))
    }
    /// How many are waiting now.
    pub fn n_waiting(&self) -> Result<usize> {
        self.inner.call("__getattribute__", ("n_waiting",))
    }
    /// Whether it is broken.
    pub fn broken(&self) -> Result<bool> {
        self.inner.call("__getattribute__", ("broken",))
    }
}
