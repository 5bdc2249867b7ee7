//! The objects a manager server holds, and the [`Served`] trait to add your own.
//!
//! Every built-in type keeps plain Python data ([`Value`]) behind its own mutex and
//! implements the methods CPython's proxies call, with CPython's names, argument
//! conventions and exceptions, so that an unmodified CPython client sees what it would
//! see from a CPython server.

use crate::reduction::pickle::{HashableValue, Value};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// An exception to raise in the client: `module.name(*args)`, e.g.
/// `builtins.KeyError('k')`. A CPython client raises exactly that class; a Rust client
/// gets [`Error::Remote`](crate::Error::Remote).
#[derive(Debug, Clone, PartialEq)]
pub struct PyException {
    /// The class's module (`builtins`, `queue`, `threading`…).
    pub module: String,
    /// The class name.
    pub name: String,
    /// The constructor arguments.
    pub args: Vec<Value>,
}

impl PyException {
    /// `builtins.<name>(message)`.
    pub fn builtin(name: &str, message: impl Into<String>) -> PyException {
        PyException {
            module: "builtins".into(),
            name: name.into(),
            args: vec![Value::String(message.into())],
        }
    }

    /// `KeyError(key)`.
    pub fn key_error(key: Value) -> PyException {
        PyException {
            module: "builtins".into(),
            name: "KeyError".into(),
            args: vec![key],
        }
    }

    /// `TypeError(message)`.
    pub fn type_error(message: impl Into<String>) -> PyException {
        PyException::builtin("TypeError", message)
    }

    fn with_module(module: &str, name: &str) -> PyException {
        PyException {
            module: module.into(),
            name: name.into(),
            args: Vec::new(),
        }
    }
}

impl fmt::Display for PyException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        match self.args.as_slice() {
            [] => Ok(()),
            [Value::String(s)] => write!(f, ": {s}"),
            [one] => write!(f, ": {}", repr(one)),
            more => write!(f, ": {}", repr(&Value::Tuple(more.to_vec()))),
        }
    }
}

/// What a method call produced.
pub enum Answer {
    /// A value, sent back as `('#RETURN', value)`.
    Return(Value),
    /// A new shared object (an iterator…), registered on the server with one reference
    /// and sent back as `('#PROXY', (exposed, token))`.
    Proxy {
        /// The type id the client knows it by (`Iterator`).
        typeid: String,
        /// The object.
        object: Arc<dyn Served>,
    },
}

impl From<Value> for Answer {
    fn from(v: Value) -> Answer {
        Answer::Return(v)
    }
}

/// One method call on a served object.
pub struct Call<'a> {
    /// The method name (already checked against [`Served::exposed`]).
    pub method: &'a str,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Vec<(String, Value)>,
    /// Identifies the calling channel (one per client proxy/thread): the owner of an
    /// `RLock` or a `Condition`.
    pub caller: u64,
    /// Returns true once the caller has hung up; blocking methods poll it so that a
    /// dead client's pending `get` does not wait (and later consume an item) forever.
    pub hung_up: &'a (dyn Fn() -> bool + Sync),
}

impl Call<'_> {
    /// Argument `i` (or keyword `name`), if given.
    pub fn arg(&self, i: usize, name: &str) -> Option<&Value> {
        self.args
            .get(i)
            .or_else(|| self.kwargs.iter().find(|(k, _)| k == name).map(|(_, v)| v))
    }

    /// Argument `i` (or keyword `name`); a `TypeError` when missing.
    pub fn required(&self, i: usize, name: &str) -> Result<&Value, PyException> {
        self.arg(i, name).ok_or_else(|| {
            PyException::type_error(format!(
                "{}() missing required argument: '{name}'",
                self.method
            ))
        })
    }

    fn timeout(&self, i: usize, blocking_idx: Option<usize>) -> Result<Wait, PyException> {
        if let Some(b) = blocking_idx {
            let block = match self.arg(b, "block").or_else(|| self.arg(b, "blocking")) {
                None => true,
                Some(v) => truthy(v),
            };
            if !block {
                return Ok(Wait::Now);
            }
        }
        match self.arg(i, "timeout") {
            None | Some(Value::None) => Ok(Wait::Forever),
            Some(v) => {
                let secs = number(v)?;
                if secs < 0.0 {
                    // threading uses -1 for "forever"; queue rejects negatives.
                    return Ok(Wait::Forever);
                }
                Ok(Wait::Until(
                    Instant::now() + Duration::from_secs_f64(secs.min(1e9)),
                ))
            }
        }
    }
}

/// How long a blocking method may wait.
#[derive(Clone, Copy)]
enum Wait {
    Now,
    Forever,
    Until(Instant),
}

const SLICE: Duration = Duration::from_millis(100);

/// Waits on `cv` while `pending(state)` holds, up to `wait`, giving up if the caller
/// hangs up. Returns the guard and whether the condition cleared.
fn wait_while<'a, T>(
    cv: &Condvar,
    mut g: MutexGuard<'a, T>,
    wait: Wait,
    call: &Call<'_>,
    mut pending: impl FnMut(&mut T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    loop {
        if !pending(&mut g) {
            return (g, true);
        }
        let slice = match wait {
            Wait::Now => return (g, false),
            Wait::Forever => SLICE,
            Wait::Until(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return (g, false);
                }
                left.min(SLICE)
            }
        };
        g = cv
            .wait_timeout(g, slice)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if (call.hung_up)() {
            return (g, false);
        }
    }
}

/// An object held by a manager server. Implement it to serve your own type (see
/// [`ServerBuilder::register`](super::ServerBuilder::register)).
///
/// ```
/// use multiprocess::managers::{Call, Answer, PyException, Served};
/// use multiprocess::reduction::pickle::Value;
/// use std::sync::atomic::{AtomicI64, Ordering};
///
/// struct Counter(AtomicI64);
/// impl Served for Counter {
///     fn exposed(&self) -> &[&'static str] { &["increment", "get"] }
///     fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
///         Ok(Value::I64(match call.method {
///             "increment" => self.0.fetch_add(1, Ordering::SeqCst) + 1,
///             _ => self.0.load(Ordering::SeqCst),
///         }).into())
///     }
/// }
/// ```
pub trait Served: Send + Sync + 'static {
    /// The method names clients may call (CPython's `exposed`).
    fn exposed(&self) -> &[&'static str];
    /// Runs one method. Return a [`PyException`] to raise it in the client.
    fn call(&self, call: Call<'_>) -> Result<Answer, PyException>;
    /// A copy of the object's value (for `#GETVALUE`, `str`, `repr`); `None` by default.
    fn snapshot(&self) -> Value {
        Value::None
    }

    /// What `str()`/`repr()` of the object gives (Python's `repr` of the referent);
    /// by default the `repr` of [`snapshot`](Served::snapshot).
    fn repr(&self) -> String {
        repr(&self.snapshot())
    }

    /// Called when the connection of `caller` (see [`Call::caller`]) closes, for every
    /// object it called: release what it held (locks do). Nothing by default.
    fn caller_gone(&self, caller: u64) {
        let _ = caller;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::None => false,
        Value::Bool(b) => *b,
        Value::I64(i) => *i != 0,
        Value::F64(f) => *f != 0.0,
        Value::String(s) => !s.is_empty(),
        Value::Bytes(b) => !b.is_empty(),
        Value::List(l) | Value::Tuple(l) => !l.is_empty(),
        Value::Dict(d) => !d.is_empty(),
        Value::Set(s) | Value::FrozenSet(s) => !s.is_empty(),
        Value::Int(_) => true,
    }
}

fn number(v: &Value) -> Result<f64, PyException> {
    match v {
        Value::I64(i) => Ok(*i as f64),
        Value::F64(f) => Ok(*f),
        Value::Bool(b) => Ok(*b as i64 as f64),
        _ => Err(PyException::type_error("a number is required")),
    }
}

fn int(v: &Value) -> Result<i64, PyException> {
    match v {
        Value::I64(i) => Ok(*i),
        Value::Bool(b) => Ok(*b as i64),
        Value::Int(_) => Err(PyException::builtin(
            "IndexError",
            "cannot fit 'int' into an index-sized integer",
        )),
        other => Err(PyException::type_error(format!(
            "'{}' object cannot be interpreted as an integer",
            type_name(other)
        ))),
    }
}

fn hashable(v: &Value) -> Result<HashableValue, PyException> {
    v.clone()
        .into_hashable()
        .map_err(|_| PyException::type_error(format!("unhashable type: '{}'", type_name(v))))
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::None => "NoneType",
        Value::Bool(_) => "bool",
        Value::I64(_) | Value::Int(_) => "int",
        Value::F64(_) => "float",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "str",
        Value::List(_) => "list",
        Value::Tuple(_) => "tuple",
        Value::Set(_) => "set",
        Value::FrozenSet(_) => "frozenset",
        Value::Dict(_) => "dict",
    }
}

/// The most bytes one result of a server-side operation may take (`list * n`,
/// `list(text)`…), as [`weight`] estimates them: a client can ask for little and
/// make the server build much.
pub(crate) const MAX_RESULT_BYTES: u64 = 64 << 20;

/// Roughly how many bytes `v` takes in memory (its slot, payload and items).
pub(crate) fn weight(v: &Value) -> u64 {
    let slot = std::mem::size_of::<Value>() as u64;
    // Iterative: no recursion over client-built nesting.
    let mut todo = vec![v];
    let mut total = 0u64;
    while let Some(v) = todo.pop() {
        total = total.saturating_add(slot);
        match v {
            Value::String(s) => total = total.saturating_add(s.len() as u64),
            Value::Bytes(b) => total = total.saturating_add(b.len() as u64),
            Value::Int(i) => total = total.saturating_add(i.bits() / 8),
            Value::List(l) | Value::Tuple(l) => todo.extend(l.iter()),
            Value::Set(s) | Value::FrozenSet(s) => {
                total = total.saturating_add(s.iter().map(hashable_weight).sum::<u64>())
            }
            Value::Dict(d) => {
                for (k, v) in d {
                    total = total.saturating_add(hashable_weight(k));
                    todo.push(v);
                }
            }
            _ => {}
        }
    }
    total
}

fn hashable_weight(h: &HashableValue) -> u64 {
    let slot = std::mem::size_of::<Value>() as u64;
    match h {
        HashableValue::String(s) => slot + s.len() as u64,
        HashableValue::Bytes(b) => slot + b.len() as u64,
        HashableValue::Int(i) => slot + i.bits() / 8,
        HashableValue::Tuple(t) => slot + t.iter().map(hashable_weight).sum::<u64>(),
        HashableValue::FrozenSet(s) => slot + s.iter().map(hashable_weight).sum::<u64>(),
        _ => slot,
    }
}

/// `MemoryError` unless `bytes` is within [`MAX_RESULT_BYTES`].
fn check_result(bytes: u64) -> Result<(), PyException> {
    if bytes > MAX_RESULT_BYTES {
        return Err(PyException::builtin(
            "MemoryError",
            format!("the result would take {bytes} bytes, more than the server's limit of {MAX_RESULT_BYTES}"),
        ));
    }
    Ok(())
}

/// Python's `repr` of plain data (close enough for messages). Integers of more than
/// 4300 digits are not converted (CPython refuses too: the conversion is quadratic).
pub(crate) fn repr(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::I64(i) => i.to_string(),
        // 4300 decimal digits take at least 14_282 bits.
        Value::Int(i) if i.bits() > 14_282 => {
            format!("<int of {} bits: more than 4300 digits>", i.bits())
        }
        Value::Int(i) => i.to_string(),
        Value::F64(f) => format!("{f:?}"),
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Bytes(b) => format!("b{:?}", String::from_utf8_lossy(b)),
        Value::List(l) => format!("[{}]", l.iter().map(repr).collect::<Vec<_>>().join(", ")),
        Value::Tuple(t) if t.len() == 1 => format!("({},)", repr(&t[0])),
        Value::Tuple(t) => format!("({})", t.iter().map(repr).collect::<Vec<_>>().join(", ")),
        Value::Set(s) | Value::FrozenSet(s) => {
            let items = s
                .iter()
                .map(|h| repr(&h.clone().into_value()))
                .collect::<Vec<_>>()
                .join(", ");
            match (v, s.is_empty()) {
                (Value::Set(_), true) => "set()".into(),
                (Value::Set(_), false) => format!("{{{items}}}"),
                (_, true) => "frozenset()".into(),
                _ => format!("frozenset({{{items}}})"),
            }
        }
        Value::Dict(d) => format!(
            "{{{}}}",
            d.iter()
                .map(|(k, v)| format!("{}: {}", repr(&k.clone().into_value()), repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn none() -> Result<Answer, PyException> {
    Ok(Answer::Return(Value::None))
}

fn ret(v: Value) -> Result<Answer, PyException> {
    Ok(Answer::Return(v))
}

fn unknown(call: &Call<'_>) -> Result<Answer, PyException> {
    Err(PyException::builtin(
        "AttributeError",
        format!("no method {:?}", call.method),
    ))
}

/// The items of `v` as Python iterates them; `MemoryError` when they would take more than
/// [`MAX_RESULT_BYTES`] (one `Value` per character of a string or byte of a `bytes`).
fn iterable(v: &Value) -> Result<Vec<Value>, PyException> {
    let slot = std::mem::size_of::<Value>() as u64;
    match v {
        Value::String(s) => check_result((s.len() as u64).saturating_mul(slot + 4))?,
        Value::Bytes(b) => check_result((b.len() as u64).saturating_mul(slot))?,
        _ => {}
    }
    match v {
        Value::List(l) | Value::Tuple(l) => Ok(l.clone()),
        Value::Set(s) | Value::FrozenSet(s) => {
            Ok(s.iter().cloned().map(|h| h.into_value()).collect())
        }
        Value::Dict(d) => Ok(d.keys().cloned().map(|h| h.into_value()).collect()),
        Value::String(s) => Ok(s.chars().map(|c| Value::String(c.to_string())).collect()),
        Value::Bytes(b) => Ok(b.iter().map(|x| Value::I64(*x as i64)).collect()),
        other => Err(PyException::type_error(format!(
            "'{}' object is not iterable",
            type_name(other)
        ))),
    }
}

// ---------------------------------------------------------------- dict

/// A map that remembers insertion order, as Python's `dict` does: updating a key keeps
/// its place, deleting and re-inserting moves it to the end. All operations O(log n).
#[derive(Default, Clone)]
struct Ordered {
    map: BTreeMap<HashableValue, (u64, Value)>,
    order: BTreeMap<u64, HashableValue>,
    next: u64,
}

impl Ordered {
    fn get(&self, k: &HashableValue) -> Option<&Value> {
        self.map.get(k).map(|(_, v)| v)
    }

    fn insert(&mut self, k: HashableValue, v: Value) {
        match self.map.get_mut(&k) {
            Some(slot) => slot.1 = v,
            None => {
                let seq = self.next;
                self.next += 1;
                self.order.insert(seq, k.clone());
                self.map.insert(k, (seq, v));
            }
        }
    }

    fn remove(&mut self, k: &HashableValue) -> Option<Value> {
        let (seq, v) = self.map.remove(k)?;
        self.order.remove(&seq);
        Some(v)
    }

    fn contains_key(&self, k: &HashableValue) -> bool {
        self.map.contains_key(k)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    fn keys(&self) -> impl Iterator<Item = &HashableValue> {
        self.order.values()
    }

    fn iter(&self) -> impl Iterator<Item = (&HashableValue, &Value)> {
        self.order
            .values()
            .filter_map(|k| self.map.get(k).map(|(_, v)| (k, v)))
    }

    fn pop_last(&mut self) -> Option<(HashableValue, Value)> {
        let (_, k) = self.order.pop_last()?;
        let (_, v) = self.map.remove(&k)?;
        Some((k, v))
    }

    fn to_value(&self) -> Value {
        Value::Dict(self.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

/// `dict` (Python's `SyncManager.dict`). Keys keep insertion order for `keys()`,
/// `values()`, `items()`, iteration and `popitem()`; a copy (`copy()`, `_getvalue()`)
/// arrives with its keys sorted.
#[derive(Default)]
pub struct Dict(Arc<Mutex<Ordered>>);

impl Dict {
    /// A dict holding `init` (a dict, or a list of pairs) plus keyword items.
    pub fn new(args: &[Value], kwargs: &[(String, Value)]) -> Result<Dict, PyException> {
        let d = Dict::default();
        {
            let mut m = lock(&d.0);
            if let Some(init) = args.first() {
                update(&mut m, init)?;
            }
            for (k, v) in kwargs {
                m.insert(HashableValue::String(k.clone()), v.clone());
            }
        }
        Ok(d)
    }
}

fn update(m: &mut Ordered, other: &Value) -> Result<(), PyException> {
    match other {
        Value::Dict(d) => {
            for (k, v) in d {
                m.insert(k.clone(), v.clone());
            }
        }
        Value::List(l) | Value::Tuple(l) => {
            for pair in l {
                match pair {
                    Value::Tuple(kv) | Value::List(kv) if kv.len() == 2 => {
                        m.insert(hashable(&kv[0])?, kv[1].clone());
                    }
                    _ => {
                        return Err(PyException::builtin(
                            "ValueError",
                            "dictionary update sequence element has wrong length",
                        ))
                    }
                }
            }
        }
        Value::None => {}
        other => {
            return Err(PyException::type_error(format!(
                "'{}' object is not iterable",
                type_name(other)
            )))
        }
    }
    Ok(())
}

pub(crate) const DICT_EXPOSED: &[&str] = &[
    "__contains__",
    "__delitem__",
    "__getitem__",
    "__iter__",
    "__len__",
    "__setitem__",
    "clear",
    "copy",
    "get",
    "items",
    "keys",
    "pop",
    "popitem",
    "setdefault",
    "update",
    "values",
];

impl Served for Dict {
    fn exposed(&self) -> &[&'static str] {
        DICT_EXPOSED
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let mut m = lock(&self.0);
        match call.method {
            "__getitem__" => {
                let k = call.required(0, "key")?;
                match m.get(&hashable(k)?) {
                    Some(v) => ret(v.clone()),
                    None => Err(PyException::key_error(k.clone())),
                }
            }
            "__setitem__" => {
                let k = hashable(call.required(0, "key")?)?;
                let v = call.required(1, "value")?.clone();
                m.insert(k, v);
                none()
            }
            "__delitem__" => {
                let k = call.required(0, "key")?;
                match m.remove(&hashable(k)?) {
                    Some(_) => none(),
                    None => Err(PyException::key_error(k.clone())),
                }
            }
            "__contains__" => {
                let k = call.required(0, "key")?;
                ret(Value::Bool(match k.clone().into_hashable() {
                    Ok(h) => m.contains_key(&h),
                    Err(_) => false,
                }))
            }
            "__len__" => ret(Value::I64(m.len() as i64)),
            "__iter__" => Ok(Answer::Proxy {
                typeid: "Iterator".into(),
                object: Arc::new(Iter::watching(
                    m.keys().cloned().map(|h| h.into_value()).collect(),
                    Arc::downgrade(&self.0),
                    m.len(),
                )),
            }),
            "clear" => {
                m.clear();
                none()
            }
            "copy" => ret(m.to_value()),
            "get" => {
                let k = call.required(0, "key")?;
                let hit = match k.clone().into_hashable() {
                    Ok(h) => m.get(&h).cloned(),
                    Err(_) => None,
                };
                ret(hit.unwrap_or_else(|| call.arg(1, "default").cloned().unwrap_or(Value::None)))
            }
            "items" => ret(Value::List(
                m.iter()
                    .map(|(k, v)| Value::Tuple(vec![k.clone().into_value(), v.clone()]))
                    .collect(),
            )),
            "keys" => ret(Value::List(
                m.keys().cloned().map(|h| h.into_value()).collect(),
            )),
            "values" => ret(Value::List(m.iter().map(|(_, v)| v.clone()).collect())),
            "pop" => {
                let k = call.required(0, "key")?;
                match m.remove(&hashable(k)?) {
                    Some(v) => ret(v),
                    None => match call.arg(1, "default") {
                        Some(d) => ret(d.clone()),
                        None => Err(PyException::key_error(k.clone())),
                    },
                }
            }
            "popitem" => match m.pop_last() {
                Some((k, v)) => ret(Value::Tuple(vec![k.into_value(), v])),
                None => Err(PyException::key_error(Value::String(
                    "popitem(): dictionary is empty".into(),
                ))),
            },
            "setdefault" => {
                let k = hashable(call.required(0, "key")?)?;
                let d = call.arg(1, "default").cloned().unwrap_or(Value::None);
                if let Some(v) = m.get(&k) {
                    return ret(v.clone());
                }
                m.insert(k, d.clone());
                ret(d)
            }
            "update" => {
                if let Some(o) = call.args.first() {
                    update(&mut m, o)?;
                }
                for (k, v) in &call.kwargs {
                    m.insert(HashableValue::String(k.clone()), v.clone());
                }
                none()
            }
            _ => unknown(&call),
        }
    }

    fn snapshot(&self) -> Value {
        lock(&self.0).to_value()
    }
}

// ---------------------------------------------------------------- list

/// `list` (Python's `SyncManager.list`). Slices are not supported (CPython pickles a
/// `slice` object, which this server does not decode): index one item at a time, or
/// take a copy.
#[derive(Default)]
pub struct List(Mutex<Vec<Value>>);

impl List {
    /// A list holding the items of `init`, if given.
    pub fn new(args: &[Value]) -> Result<List, PyException> {
        Ok(List(Mutex::new(match args.first() {
            Some(v) => iterable(v)?,
            None => Vec::new(),
        })))
    }
}

pub(crate) const LIST_EXPOSED: &[&str] = &[
    "__add__",
    "__contains__",
    "__delitem__",
    "__getitem__",
    "__len__",
    "__mul__",
    "__reversed__",
    "__rmul__",
    "__setitem__",
    "append",
    "count",
    "extend",
    "index",
    "insert",
    "pop",
    "remove",
    "reverse",
    "sort",
    "__imul__",
];

fn index(len: usize, i: &Value, what: &str) -> Result<usize, PyException> {
    let i = match i {
        Value::I64(_) | Value::Bool(_) | Value::Int(_) => int(i)?,
        other => {
            return Err(PyException::type_error(format!(
                "list indices must be integers, not {}",
                type_name(other)
            )))
        }
    };
    let j = if i < 0 { i + len as i64 } else { i };
    if j < 0 || j >= len as i64 {
        return Err(PyException::builtin("IndexError", what));
    }
    Ok(j as usize)
}

/// The positions a slice selects in a sequence of `len` items (Python's
/// `slice.indices` then `range`), or a `TypeError`/`ValueError` as Python raises.
fn slice_positions(len: usize, v: &Value) -> Result<Option<Vec<usize>>, PyException> {
    let Some((start, stop, step)) = super::pyobj::slice(v) else {
        return Ok(None);
    };
    let part = |v: &Value| -> Result<Option<i64>, PyException> {
        match v {
            Value::None => Ok(None),
            Value::I64(_) | Value::Bool(_) | Value::Int(_) => Ok(Some(int(v)?)),
            _ => Err(PyException::type_error(
                "slice indices must be integers or None or have an __index__ method",
            )),
        }
    };
    let step = part(step)?.unwrap_or(1);
    if step == 0 {
        return Err(PyException::builtin(
            "ValueError",
            "slice step cannot be zero",
        ));
    }
    let len = len as i64;
    let adjust = |v: Option<i64>, dflt: i64| -> i64 {
        match v {
            None => dflt,
            Some(i) if i < 0 => {
                let j = i + len;
                if j < 0 {
                    if step < 0 {
                        -1
                    } else {
                        0
                    }
                } else {
                    j
                }
            }
            Some(i) if i >= len => {
                if step < 0 {
                    len - 1
                } else {
                    len
                }
            }
            Some(i) => i,
        }
    };
    let (lo, hi) = if step < 0 { (len - 1, -1) } else { (0, len) };
    let mut i = adjust(part(start)?, lo);
    let end = adjust(part(stop)?, hi);
    let mut out = Vec::new();
    while (step > 0 && i < end) || (step < 0 && i > end) {
        out.push(i as usize);
        i += step;
    }
    Ok(Some(out))
}

/// `seq[slice] = items`: a step-1 slice is replaced by any number of items; an
/// extended one needs as many as it selects.
fn assign_slice(
    l: &mut Vec<Value>,
    key: &Value,
    positions: Vec<usize>,
    items: Vec<Value>,
) -> Result<(), PyException> {
    let step1 = matches!(super::pyobj::slice(key), Some((_, _, s)) if matches!(s, Value::None | Value::I64(1)));
    if step1 {
        let start = match positions.first() {
            Some(&p) => p,
            None => {
                // An empty selection: insert where the slice starts.
                let (a, _, _) =
                    super::pyobj::slice(key).unwrap_or((&Value::None, &Value::None, &Value::None));
                let len = l.len() as i64;
                match a {
                    Value::None => 0,
                    v => {
                        let i = int(v)?;
                        (if i < 0 { (i + len).max(0) } else { i.min(len) }) as usize
                    }
                }
            }
        };
        l.splice(start..start + positions.len(), items);
        return Ok(());
    }
    if positions.len() != items.len() {
        return Err(PyException::builtin(
            "ValueError",
            format!(
                "attempt to assign sequence of size {} to extended slice of size {}",
                items.len(),
                positions.len()
            ),
        ));
    }
    for (p, v) in positions.into_iter().zip(items) {
        l[p] = v;
    }
    Ok(())
}

fn sort_key(v: &Value) -> Result<HashableValue, PyException> {
    // Lists sort by their items; make them comparable as tuples.
    match v {
        Value::List(l) => Ok(HashableValue::Tuple(
            l.iter().map(sort_key).collect::<Result<_, _>>()?,
        )),
        other => hashable(other),
    }
}

impl Served for List {
    fn exposed(&self) -> &[&'static str] {
        LIST_EXPOSED
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let mut l = lock(&self.0);
        match call.method {
            "__getitem__" => {
                let key = call.required(0, "index")?;
                if let Some(ps) = slice_positions(l.len(), key)? {
                    return ret(Value::List(ps.into_iter().map(|p| l[p].clone()).collect()));
                }
                let i = index(l.len(), key, "list index out of range")?;
                ret(l[i].clone())
            }
            "__setitem__" => {
                let key = call.required(0, "index")?;
                if let Some(ps) = slice_positions(l.len(), key)? {
                    let items = iterable(call.required(1, "value")?)?;
                    assign_slice(&mut l, key, ps, items)?;
                    return none();
                }
                let i = index(
                    l.len(),
                    call.required(0, "index")?,
                    "list assignment index out of range",
                )?;
                l[i] = call.required(1, "value")?.clone();
                none()
            }
            "__delitem__" => {
                let key = call.required(0, "index")?;
                if let Some(ps) = slice_positions(l.len(), key)? {
                    let mut drop: Vec<bool> = vec![false; l.len()];
                    ps.into_iter().for_each(|p| drop[p] = true);
                    let mut k = 0;
                    l.retain(|_| {
                        k += 1;
                        !drop[k - 1]
                    });
                    return none();
                }
                let i = index(
                    l.len(),
                    call.required(0, "index")?,
                    "list assignment index out of range",
                )?;
                l.remove(i);
                none()
            }
            "__len__" => ret(Value::I64(l.len() as i64)),
            "__contains__" => {
                let x = call.required(0, "value")?;
                ret(Value::Bool(l.contains(x)))
            }
            "__add__" => {
                let mut out = l.clone();
                out.extend(iterable(call.required(0, "other")?)?);
                ret(Value::List(out))
            }
            "__mul__" | "__rmul__" | "__imul__" => {
                let n = int(call.required(0, "n")?)?.max(0) as usize;
                // Bounded by the bytes of the result, not its length: `[big] * n`.
                let each: u64 = l.iter().map(weight).fold(0, u64::saturating_add);
                check_result(each.saturating_mul(n as u64))?;
                let out: Vec<Value> = l.iter().cloned().cycle().take(l.len() * n).collect();
                if call.method == "__imul__" {
                    *l = out.clone();
                }
                ret(Value::List(out))
            }
            "__reversed__" => ret(Value::List(l.iter().rev().cloned().collect())),
            "append" => {
                l.push(call.required(0, "object")?.clone());
                none()
            }
            "count" => {
                let x = call.required(0, "value")?;
                ret(Value::I64(l.iter().filter(|y| *y == x).count() as i64))
            }
            "extend" => {
                let items = iterable(call.required(0, "iterable")?)?;
                l.extend(items);
                none()
            }
            "index" => {
                let x = call.required(0, "value")?;
                let len = l.len() as i64;
                let clamp = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) } as usize;
                let start = match call.arg(1, "start") {
                    Some(v) => clamp(int(v)?),
                    None => 0,
                };
                let stop = match call.arg(2, "stop") {
                    Some(v) => clamp(int(v)?),
                    None => l.len(),
                };
                match (start..stop.max(start)).find(|&i| &l[i] == x) {
                    Some(i) => ret(Value::I64(i as i64)),
                    None => Err(PyException::builtin(
                        "ValueError",
                        format!("{} is not in list", repr(x)),
                    )),
                }
            }
            "insert" => {
                let i = int(call.required(0, "index")?)?;
                let len = l.len() as i64;
                let at = if i < 0 { (i + len).max(0) } else { i.min(len) } as usize;
                l.insert(at, call.required(1, "object")?.clone());
                none()
            }
            "pop" => {
                if l.is_empty() {
                    return Err(PyException::builtin("IndexError", "pop from empty list"));
                }
                let i = match call.arg(0, "index") {
                    Some(v) => index(l.len(), v, "pop index out of range")?,
                    None => l.len() - 1,
                };
                ret(l.remove(i))
            }
            "remove" => {
                let x = call.required(0, "value")?;
                match l.iter().position(|y| y == x) {
                    Some(i) => {
                        l.remove(i);
                        none()
                    }
                    None => Err(PyException::builtin(
                        "ValueError",
                        "list.remove(x): x not in list",
                    )),
                }
            }
            "reverse" => {
                l.reverse();
                none()
            }
            "sort" => {
                if call
                    .arg(usize::MAX, "key")
                    .is_some_and(|k| *k != Value::None)
                {
                    return Err(PyException::type_error(
                        "sort(key=...) cannot be sent to a manager",
                    ));
                }
                let mut keyed = l
                    .iter()
                    .map(|v| Ok((sort_key(v)?, v.clone())))
                    .collect::<Result<Vec<_>, PyException>>()?;
                keyed.sort_by(|a, b| a.0.cmp(&b.0));
                if call.arg(usize::MAX, "reverse").is_some_and(truthy) {
                    keyed.reverse();
                }
                *l = keyed.into_iter().map(|(_, v)| v).collect();
                none()
            }
            _ => unknown(&call),
        }
    }

    fn snapshot(&self) -> Value {
        Value::List(lock(&self.0).clone())
    }
}

/// `Array(typecode, sequence)`: a fixed-length list exposing `__len__`, `__getitem__`,
/// `__setitem__`, slices included (Python's `ArrayProxy`). With a typecode (see
/// [`Array::typed`]) stored items are checked as `array.array` checks them: integer codes
/// take ints, `f`/`d` numbers, `u` one-character strings (`TypeError` otherwise).
pub struct Array(List, char);

impl Array {
    /// An array holding the items of `sequence`, of any type.
    pub fn new(sequence: &Value) -> Result<Array, PyException> {
        Ok(Array(List::new(std::slice::from_ref(sequence))?, 'O'))
    }

    /// `Array(typecode, sequence)`: the items are checked against `typecode`.
    ///
    /// # Errors
    /// `ValueError` for an unknown typecode, `TypeError` for an item of the wrong type.
    pub fn typed(typecode: &str, sequence: &Value) -> Result<Array, PyException> {
        let code = match typecode {
            c if c.len() == 1 && "bBuhHiIlLqQfd".contains(c) => c.chars().next().unwrap_or('O'),
            _ => {
                return Err(PyException::builtin(
                    "ValueError",
                    "bad typecode (must be b, B, u, h, H, i, I, l, L, q, Q, f or d)",
                ))
            }
        };
        let a = Array(List::new(std::slice::from_ref(sequence))?, code);
        for v in lock(&a.0 .0).iter() {
            a.check(v)?;
        }
        Ok(a)
    }

    fn check(&self, v: &Value) -> Result<(), PyException> {
        let ok = match self.1 {
            'O' => true,
            'f' | 'd' => matches!(
                v,
                Value::I64(_) | Value::Int(_) | Value::F64(_) | Value::Bool(_)
            ),
            'u' => matches!(v, Value::String(s) if s.chars().count() == 1),
            _ => matches!(v, Value::I64(_) | Value::Int(_) | Value::Bool(_)),
        };
        if ok {
            Ok(())
        } else {
            Err(PyException::type_error(format!(
                "array item must be {}, not {}",
                match self.1 {
                    'f' | 'd' => "float",
                    'u' => "unicode character",
                    _ => "int",
                },
                type_name(v)
            )))
        }
    }
}

impl Served for Array {
    fn exposed(&self) -> &[&'static str] {
        &["__len__", "__getitem__", "__setitem__"]
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        if call.method == "__setitem__" {
            let v = call.required(1, "value")?;
            if super::pyobj::slice(call.required(0, "index")?).is_some() {
                iterable(v)?.iter().try_for_each(|x| self.check(x))?;
            } else {
                self.check(v)?;
            }
        }
        self.0.call(call)
    }

    fn snapshot(&self) -> Value {
        self.0.snapshot()
    }
}

// ---------------------------------------------------------------- set

/// `set` (CPython 3.14's `SyncManager.set`, with its `SetProxy` methods): a set of
/// hashable values.
#[derive(Default)]
pub struct Set(Mutex<BTreeSet<HashableValue>>);

impl Set {
    /// A set holding the items of `args[0]` (any iterable), or empty.
    ///
    /// # Errors
    /// `TypeError` for a non-iterable or an unhashable item.
    pub fn new(args: &[Value]) -> Result<Set, PyException> {
        let items = match args.first() {
            Some(v) => set_of(v)?,
            None => BTreeSet::new(),
        };
        Ok(Set(Mutex::new(items)))
    }
}

fn set_of(v: &Value) -> Result<BTreeSet<HashableValue>, PyException> {
    iterable(v)?.iter().map(hashable).collect()
}

pub(crate) const SET_EXPOSED: &[&str] = &[
    "__and__",
    "__contains__",
    "__iand__",
    "__ior__",
    "__isub__",
    "__iter__",
    "__ixor__",
    "__len__",
    "__or__",
    "__rand__",
    "__ror__",
    "__rsub__",
    "__rxor__",
    "__sub__",
    "__xor__",
    "__ge__",
    "__gt__",
    "__le__",
    "__lt__",
    "add",
    "clear",
    "copy",
    "difference",
    "difference_update",
    "discard",
    "intersection",
    "intersection_update",
    "isdisjoint",
    "issubset",
    "issuperset",
    "pop",
    "remove",
    "symmetric_difference",
    "symmetric_difference_update",
    "union",
    "update",
];

impl Served for Set {
    fn exposed(&self) -> &[&'static str] {
        SET_EXPOSED
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let mut s = lock(&self.0);
        let others = || -> Result<Vec<BTreeSet<HashableValue>>, PyException> {
            call.args.iter().map(set_of).collect()
        };
        let one = || set_of(call.required(0, "other")?);
        let out = |x: BTreeSet<HashableValue>| ret(Value::Set(x));
        match call.method {
            "__len__" => ret(Value::I64(s.len() as i64)),
            "__contains__" => ret(Value::Bool(
                hashable(call.required(0, "key")?).is_ok_and(|k| s.contains(&k)),
            )),
            "__iter__" => Ok(Answer::Proxy {
                typeid: "Iterator".into(),
                object: Arc::new(Iter::new(
                    s.iter().cloned().map(|h| h.into_value()).collect(),
                )),
            }),
            "add" => {
                s.insert(hashable(call.required(0, "elem")?)?);
                none()
            }
            "discard" => {
                s.remove(&hashable(call.required(0, "elem")?)?);
                none()
            }
            "remove" => {
                let k = hashable(call.required(0, "elem")?)?;
                if s.remove(&k) {
                    none()
                } else {
                    Err(PyException::key_error(k.into_value()))
                }
            }
            "pop" => match s.pop_first() {
                Some(k) => ret(k.into_value()),
                None => Err(PyException::builtin("KeyError", "pop from an empty set")),
            },
            "clear" => {
                s.clear();
                none()
            }
            "copy" => out(s.clone()),
            "union" | "__or__" | "__ror__" => {
                let mut x = s.clone();
                others()?.into_iter().for_each(|o| x.extend(o));
                out(x)
            }
            "intersection" | "__and__" | "__rand__" => {
                let mut x = s.clone();
                for o in others()? {
                    x.retain(|k| o.contains(k));
                }
                out(x)
            }
            "difference" | "__sub__" => {
                let mut x = s.clone();
                for o in others()? {
                    x.retain(|k| !o.contains(k));
                }
                out(x)
            }
            "__rsub__" => out(one()?.difference(&s).cloned().collect()),
            "symmetric_difference" | "__xor__" | "__rxor__" => {
                out(s.symmetric_difference(&one()?).cloned().collect())
            }
            "update" | "__ior__" => {
                others()?.into_iter().for_each(|o| s.extend(o));
                if call.method == "update" {
                    none()
                } else {
                    out(s.clone())
                }
            }
            "intersection_update" | "__iand__" => {
                for o in others()? {
                    s.retain(|k| o.contains(k));
                }
                if call.method == "__iand__" {
                    out(s.clone())
                } else {
                    none()
                }
            }
            "difference_update" | "__isub__" => {
                for o in others()? {
                    s.retain(|k| !o.contains(k));
                }
                if call.method == "__isub__" {
                    out(s.clone())
                } else {
                    none()
                }
            }
            "symmetric_difference_update" | "__ixor__" => {
                let x: BTreeSet<HashableValue> = s.symmetric_difference(&one()?).cloned().collect();
                *s = x;
                if call.method == "__ixor__" {
                    out(s.clone())
                } else {
                    none()
                }
            }
            "isdisjoint" => ret(Value::Bool(s.is_disjoint(&one()?))),
            "issubset" | "__le__" => ret(Value::Bool(s.is_subset(&one()?))),
            "issuperset" | "__ge__" => ret(Value::Bool(s.is_superset(&one()?))),
            "__lt__" => {
                let o = one()?;
                ret(Value::Bool(s.len() < o.len() && s.is_subset(&o)))
            }
            "__gt__" => {
                let o = one()?;
                ret(Value::Bool(s.len() > o.len() && s.is_superset(&o)))
            }
            _ => unknown(&call),
        }
    }

    fn snapshot(&self) -> Value {
        Value::Set(lock(&self.0).clone())
    }
}

// ---------------------------------------------------------------- iterator

/// `Iterator`: what `__iter__` of a dict returns (over a copy of the keys).
pub struct Iter(
    Mutex<VecDeque<Value>>,
    Option<(Weak<Mutex<Ordered>>, usize)>,
);

impl Iter {
    /// An iterator over these items.
    pub fn new(items: Vec<Value>) -> Iter {
        Iter(Mutex::new(items.into()), None)
    }

    /// An iterator over a dict's keys that raises `RuntimeError` once the dict's size
    /// changes, as iterating a real dict does.
    fn watching(items: Vec<Value>, dict: Weak<Mutex<Ordered>>, len: usize) -> Iter {
        Iter(Mutex::new(items.into()), Some((dict, len)))
    }
}

impl Served for Iter {
    fn exposed(&self) -> &[&'static str] {
        &["__next__", "send", "throw", "close"]
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let mut it = lock(&self.0);
        if let (Some((dict, len)), "__next__" | "send") = (&self.1, call.method) {
            if dict.upgrade().is_some_and(|d| lock(&d).len() != *len) {
                return Err(PyException::builtin(
                    "RuntimeError",
                    "dictionary changed size during iteration",
                ));
            }
        }
        match call.method {
            "__next__" | "send" => match it.pop_front() {
                Some(v) => ret(v),
                None => Err(PyException::with_module("builtins", "StopIteration")),
            },
            "close" => {
                it.clear();
                none()
            }
            _ => Err(PyException::type_error("cannot throw into this iterator")),
        }
    }
}

// ---------------------------------------------------------------- queue

struct QueueState {
    items: VecDeque<Value>,
    unfinished: u64,
}

/// `Queue` / `JoinableQueue` (Python's `queue.Queue` held by the server).
pub struct Queue {
    maxsize: usize,
    state: Mutex<QueueState>,
    changed: Condvar,
}

impl Queue {
    /// A queue of at most `maxsize` items (0: unbounded).
    pub fn new(maxsize: usize) -> Queue {
        Queue {
            maxsize,
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                unfinished: 0,
            }),
            changed: Condvar::new(),
        }
    }
}

pub(crate) const QUEUE_EXPOSED: &[&str] = &[
    "empty",
    "full",
    "get",
    "get_nowait",
    "join",
    "put",
    "put_nowait",
    "qsize",
    "task_done",
];

impl Served for Queue {
    fn exposed(&self) -> &[&'static str] {
        QUEUE_EXPOSED
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let g = lock(&self.state);
        match call.method {
            "put" | "put_nowait" => {
                let item = call.required(0, "item")?.clone();
                let wait = if call.method == "put_nowait" {
                    Wait::Now
                } else {
                    call.timeout(2, Some(1))?
                };
                let max = self.maxsize;
                let (mut g, ok) = wait_while(&self.changed, g, wait, &call, |s| {
                    max > 0 && s.items.len() >= max
                });
                if !ok {
                    return Err(PyException::with_module("queue", "Full"));
                }
                g.items.push_back(item);
                g.unfinished += 1;
                self.changed.notify_all();
                none()
            }
            "get" | "get_nowait" => {
                let wait = if call.method == "get_nowait" {
                    Wait::Now
                } else {
                    call.timeout(1, Some(0))?
                };
                let (mut g, ok) = wait_while(&self.changed, g, wait, &call, |s| s.items.is_empty());
                if !ok {
                    return Err(PyException::with_module("queue", "Empty"));
                }
                let v = g.items.pop_front().unwrap_or(Value::None);
                self.changed.notify_all();
                ret(v)
            }
            "qsize" => ret(Value::I64(g.items.len() as i64)),
            "empty" => ret(Value::Bool(g.items.is_empty())),
            "full" => ret(Value::Bool(
                self.maxsize > 0 && g.items.len() >= self.maxsize,
            )),
            "task_done" => {
                let mut g = g;
                if g.unfinished == 0 {
                    return Err(PyException::builtin(
                        "ValueError",
                        "task_done() called too many times",
                    ));
                }
                g.unfinished -= 1;
                self.changed.notify_all();
                none()
            }
            "join" => {
                let _ = wait_while(&self.changed, g, Wait::Forever, &call, |s| s.unfinished > 0);
                none()
            }
            _ => unknown(&call),
        }
    }

    fn snapshot(&self) -> Value {
        Value::List(lock(&self.state).items.iter().cloned().collect())
    }
}

// ---------------------------------------------------------------- Value, Namespace

/// `Value(typecode, value)`: one value behind `get`/`set`.
pub struct ValueCell {
    typecode: String,
    value: Mutex<Value>,
}

impl ValueCell {
    /// A cell with this typecode (kept for `repr`) and value.
    pub fn new(typecode: String, value: Value) -> ValueCell {
        ValueCell {
            typecode,
            value: Mutex::new(value),
        }
    }
}

impl Served for ValueCell {
    fn exposed(&self) -> &[&'static str] {
        &["get", "set"]
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        match call.method {
            "get" => ret(lock(&self.value).clone()),
            "set" => {
                *lock(&self.value) = call.required(0, "value")?.clone();
                none()
            }
            _ => unknown(&call),
        }
    }

    fn snapshot(&self) -> Value {
        Value::Tuple(vec![
            Value::String(self.typecode.clone()),
            lock(&self.value).clone(),
        ])
    }
}

/// `Namespace`: attributes by name.
#[derive(Default)]
pub struct Namespace(Mutex<BTreeMap<String, Value>>);

impl Namespace {
    /// A namespace with these attributes.
    pub fn new(kwargs: &[(String, Value)]) -> Namespace {
        Namespace(Mutex::new(kwargs.iter().cloned().collect()))
    }
}

impl Served for Namespace {
    fn exposed(&self) -> &[&'static str] {
        &["__getattribute__", "__setattr__", "__delattr__"]
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let name = match call.required(0, "name")? {
            Value::String(s) => s.clone(),
            _ => return Err(PyException::type_error("attribute name must be string")),
        };
        let mut m = lock(&self.0);
        let missing = || {
            PyException::builtin(
                "AttributeError",
                format!("'Namespace' object has no attribute '{name}'"),
            )
        };
        match call.method {
            "__getattribute__" => m
                .get(&name)
                .cloned()
                .map(Answer::Return)
                .ok_or_else(missing),
            "__setattr__" => {
                m.insert(name.clone(), call.required(1, "value")?.clone());
                none()
            }
            "__delattr__" => m
                .remove(&name)
                .map(|_| Answer::Return(Value::None))
                .ok_or_else(missing),
            _ => unknown(&call),
        }
    }

    /// `Namespace(a=1, b='x')`, names sorted, as CPython's `Namespace.__repr__`.
    fn repr(&self) -> String {
        let items: Vec<String> = lock(&self.0)
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .map(|(k, v)| format!("{k}={}", repr(v)))
            .collect();
        format!("Namespace({})", items.join(", "))
    }

    fn snapshot(&self) -> Value {
        Value::Dict(
            lock(&self.0)
                .iter()
                .map(|(k, v)| (HashableValue::String(k.clone()), v.clone()))
                .collect(),
        )
    }
}

// ---------------------------------------------------------------- sync primitives

/// `Lock`, `Semaphore(n)` and `BoundedSemaphore(n)`: a counter with acquire/release.
/// A `Lock` is a bounded semaphore of 1 that raises `RuntimeError` on a release while
/// unlocked. The server remembers which caller (proxy connection) holds how many: when
/// that connection closes — the proxy was dropped or its process died — what it still
/// holds is released, so a killed client cannot leave the lock held for ever.
pub struct Semaphore {
    state: Mutex<SemState>,
    bound: Option<i64>,
    is_lock: bool,
    changed: Condvar,
}

struct SemState {
    count: i64,
    holders: std::collections::HashMap<u64, i64>,
}

impl Semaphore {
    /// A semaphore starting at `value`; `bound` makes over-release an error.
    pub fn new(value: i64, bound: Option<i64>, is_lock: bool) -> Semaphore {
        Semaphore {
            state: Mutex::new(SemState {
                count: value,
                holders: Default::default(),
            }),
            bound,
            is_lock,
            changed: Condvar::new(),
        }
    }
}

impl Served for Semaphore {
    fn exposed(&self) -> &[&'static str] {
        &["acquire", "release"]
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        match call.method {
            "acquire" => {
                let wait = call.timeout(1, Some(0))?;
                let g = lock(&self.state);
                let (mut g, ok) = wait_while(&self.changed, g, wait, &call, |s| s.count <= 0);
                if ok {
                    g.count -= 1;
                    *g.holders.entry(call.caller).or_insert(0) += 1;
                }
                ret(Value::Bool(ok))
            }
            "release" => {
                let n = match call.arg(0, "n") {
                    Some(v) => int(v)?.max(1),
                    None => 1,
                };
                let mut g = lock(&self.state);
                if let Some(b) = self.bound {
                    if g.count + n > b {
                        return Err(if self.is_lock {
                            PyException::builtin("RuntimeError", "release unlocked lock")
                        } else {
                            PyException::builtin("ValueError", "Semaphore released too many times")
                        });
                    }
                }
                g.count += n;
                // Anyone may release (as in Python): take it off the caller first, then
                // off the others.
                let mut left = n;
                let mut order: Vec<u64> = g.holders.keys().copied().collect();
                order.sort_by_key(|c| *c != call.caller);
                for c in order {
                    if left == 0 {
                        break;
                    }
                    if let Some(h) = g.holders.get_mut(&c) {
                        let take = (*h).min(left);
                        *h -= take;
                        left -= take;
                        if *h == 0 {
                            g.holders.remove(&c);
                        }
                    }
                }
                self.changed.notify_all();
                none()
            }
            _ => unknown(&call),
        }
    }

    fn caller_gone(&self, caller: u64) {
        let mut g = lock(&self.state);
        if let Some(n) = g.holders.remove(&caller) {
            g.count += n;
            self.changed.notify_all();
        }
    }
}

/// `RLock`: owned by the calling channel (one per client proxy), re-entrant; released
/// when its owner's connection closes.
#[derive(Default)]
pub struct RLock {
    state: Mutex<(Option<u64>, u64)>,
    changed: Condvar,
}

impl Served for RLock {
    fn exposed(&self) -> &[&'static str] {
        &["acquire", "release"]
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let me = call.caller;
        match call.method {
            "acquire" => {
                let wait = call.timeout(1, Some(0))?;
                let g = lock(&self.state);
                let (mut g, ok) = wait_while(&self.changed, g, wait, &call, |s| {
                    s.0.is_some_and(|o| o != me)
                });
                if ok {
                    g.0 = Some(me);
                    g.1 += 1;
                }
                ret(Value::Bool(ok))
            }
            "release" => {
                let mut g = lock(&self.state);
                if g.0 != Some(me) {
                    return Err(PyException::builtin(
                        "RuntimeError",
                        "cannot release un-acquired lock",
                    ));
                }
                g.1 -= 1;
                if g.1 == 0 {
                    g.0 = None;
                    self.changed.notify_all();
                }
                none()
            }
            _ => unknown(&call),
        }
    }

    fn caller_gone(&self, caller: u64) {
        let mut g = lock(&self.state);
        if g.0 == Some(caller) {
            *g = (None, 0);
            self.changed.notify_all();
        }
    }
}

/// `Event`: a flag with wait.
#[derive(Default)]
pub struct Event {
    flag: Mutex<bool>,
    changed: Condvar,
}

impl Served for Event {
    fn exposed(&self) -> &[&'static str] {
        &["is_set", "set", "clear", "wait"]
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let mut g = lock(&self.flag);
        match call.method {
            "is_set" => ret(Value::Bool(*g)),
            "set" => {
                *g = true;
                self.changed.notify_all();
                none()
            }
            "clear" => {
                *g = false;
                none()
            }
            "wait" => {
                let wait = call.timeout(0, None)?;
                let (g, _) = wait_while(&self.changed, g, wait, &call, |f| !*f);
                ret(Value::Bool(*g))
            }
            _ => unknown(&call),
        }
    }
}

struct CondState {
    owner: Option<u64>,
    depth: u64,
    next_ticket: u64,
    waiting: VecDeque<u64>,
    notified: HashSet<u64>,
}

/// `Condition`: a re-entrant lock owned by the calling channel, with wait/notify;
/// released when its owner's connection closes.
pub struct Condition {
    state: Mutex<CondState>,
    changed: Condvar,
}

impl Default for Condition {
    fn default() -> Self {
        Condition {
            state: Mutex::new(CondState {
                owner: None,
                depth: 0,
                next_ticket: 0,
                waiting: VecDeque::new(),
                notified: HashSet::new(),
            }),
            changed: Condvar::new(),
        }
    }
}

impl Served for Condition {
    fn exposed(&self) -> &[&'static str] {
        &[
            "acquire",
            "release",
            "wait",
            "wait_for",
            "notify",
            "notify_all",
        ]
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let me = call.caller;
        let not_owner = || PyException::builtin("RuntimeError", "cannot wait on un-acquired lock");
        match call.method {
            "acquire" => {
                let wait = call.timeout(1, Some(0))?;
                let g = lock(&self.state);
                let (mut g, ok) = wait_while(&self.changed, g, wait, &call, |s| {
                    s.owner.is_some_and(|o| o != me)
                });
                if ok {
                    g.owner = Some(me);
                    g.depth += 1;
                }
                ret(Value::Bool(ok))
            }
            "release" => {
                let mut g = lock(&self.state);
                if g.owner != Some(me) {
                    return Err(PyException::builtin(
                        "RuntimeError",
                        "cannot release un-acquired lock",
                    ));
                }
                g.depth -= 1;
                if g.depth == 0 {
                    g.owner = None;
                    self.changed.notify_all();
                }
                none()
            }
            "wait" => {
                let wait = call.timeout(0, None)?;
                let mut g = lock(&self.state);
                if g.owner != Some(me) {
                    return Err(not_owner());
                }
                let ticket = g.next_ticket;
                g.next_ticket += 1;
                g.waiting.push_back(ticket);
                let depth = g.depth;
                g.owner = None;
                g.depth = 0;
                self.changed.notify_all();
                let (mut g, ok) = wait_while(&self.changed, g, wait, &call, |s| {
                    !s.notified.contains(&ticket)
                });
                g.notified.remove(&ticket);
                g.waiting.retain(|t| *t != ticket);
                // Re-acquire, however long it takes (as threading.Condition does).
                let (mut g, got) = wait_while(&self.changed, g, Wait::Forever, &call, |s| {
                    s.owner.is_some_and(|o| o != me)
                });
                if !got {
                    // The caller hung up: it must not end up owning the lock.
                    return Err(PyException::builtin("RuntimeError", "caller went away"));
                }
                g.owner = Some(me);
                g.depth = depth;
                ret(Value::Bool(ok))
            }
            "notify" | "notify_all" => {
                let mut g = lock(&self.state);
                if g.owner != Some(me) {
                    return Err(PyException::builtin(
                        "RuntimeError",
                        "cannot notify on un-acquired lock",
                    ));
                }
                let n = if call.method == "notify_all" {
                    usize::MAX
                } else {
                    match call.arg(0, "n") {
                        Some(v) => int(v)?.max(0) as usize,
                        None => 1,
                    }
                };
                for _ in 0..n {
                    match g.waiting.pop_front() {
                        Some(t) => {
                            g.notified.insert(t);
                        }
                        None => break,
                    }
                }
                self.changed.notify_all();
                none()
            }
            _ => Err(PyException::type_error(
                "wait_for(predicate) cannot be sent to a manager",
            )),
        }
    }

    fn caller_gone(&self, caller: u64) {
        let mut g = lock(&self.state);
        if g.owner == Some(caller) {
            g.owner = None;
            g.depth = 0;
            self.changed.notify_all();
        }
    }
}

struct BarrierState {
    count: usize,
    generation: u64,
    broken: bool,
    /// The latest generations ended by `reset` (their waiters raise
    /// `BrokenBarrierError`), a few kept for waiters not yet scheduled.
    reset: VecDeque<u64>,
}

/// `Barrier(parties)`: `wait` returns the arrival index (0..parties).
pub struct Barrier {
    parties: usize,
    timeout: Option<f64>,
    state: Mutex<BarrierState>,
    changed: Condvar,
}

impl Barrier {
    /// A barrier for `parties` callers, with an optional default timeout in seconds.
    pub fn new(parties: usize, timeout: Option<f64>) -> Barrier {
        Barrier {
            parties,
            timeout,
            state: Mutex::new(BarrierState {
                count: 0,
                generation: 0,
                broken: false,
                reset: VecDeque::new(),
            }),
            changed: Condvar::new(),
        }
    }
}

fn broken_barrier() -> PyException {
    PyException::with_module("threading", "BrokenBarrierError")
}

impl Served for Barrier {
    fn exposed(&self) -> &[&'static str] {
        &["__getattribute__", "wait", "abort", "reset"]
    }

    fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
        let mut g = lock(&self.state);
        match call.method {
            "wait" => {
                if g.broken {
                    return Err(broken_barrier());
                }
                let wait = match (call.arg(0, "timeout"), self.timeout) {
                    (None | Some(Value::None), Some(t)) => {
                        Wait::Until(Instant::now() + Duration::from_secs_f64(t.max(0.0)))
                    }
                    _ => call.timeout(0, None)?,
                };
                let index = g.count;
                g.count += 1;
                if g.count == self.parties {
                    g.count = 0;
                    g.generation += 1;
                    self.changed.notify_all();
                    return ret(Value::I64(index as i64));
                }
                let gen = g.generation;
                let (mut g, ok) = wait_while(&self.changed, g, wait, &call, |s| {
                    s.generation == gen && !s.broken
                });
                if g.reset.contains(&gen) {
                    return Err(broken_barrier());
                }
                if !ok || g.broken && g.generation == gen {
                    g.broken = true;
                    self.changed.notify_all();
                    return Err(broken_barrier());
                }
                ret(Value::I64(index as i64))
            }
            "abort" => {
                g.broken = true;
                self.changed.notify_all();
                none()
            }
            "reset" => {
                // Waiters of the current generation wake with BrokenBarrierError; the
                // barrier is usable again at once.
                if g.count > 0 {
                    let gen = g.generation;
                    if g.reset.len() == 64 {
                        g.reset.pop_front();
                    }
                    g.reset.push_back(gen);
                    self.changed.notify_all();
                }
                g.count = 0;
                g.generation += 1;
                g.broken = false;
                none()
            }
            "__getattribute__" => match call.required(0, "name")? {
                Value::String(s) if s == "parties" => ret(Value::I64(self.parties as i64)),
                Value::String(s) if s == "n_waiting" => ret(Value::I64(g.count as i64)),
                Value::String(s) if s == "broken" => ret(Value::Bool(g.broken)),
                other => Err(PyException::builtin(
                    "AttributeError",
                    format!("'Barrier' object has no attribute {}", repr(other)),
                )),
            },
            _ => unknown(&call),
        }
    }
}
