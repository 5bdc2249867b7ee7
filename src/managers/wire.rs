//! The manager protocol's messages as bytes: requests and replies, pickled the way
//! CPython's `multiprocessing.managers` writes and reads them.
//!
//! Decoding uses [`serde-pickle`](https://docs.rs/serde-pickle) (it never executes
//! anything). Encoding is done here, opcode by opcode, because replies must name a few
//! Python classes (`builtins.KeyError`, `multiprocessing.managers.Token`) that a data
//! serializer cannot express. Everything is written as pickle protocol 3, which every
//! Python 3 reads.
//!
//! ```
//! use multiprocess::managers::wire::{decode_request, encode_request, Request};
//! use multiprocess::reduction::pickle::Value;
//! let bytes = encode_request(Some("1f"), "__getitem__", &[Value::String("k".into())], &[]);
//! let req: Request = decode_request(&bytes)?;
//! assert_eq!(req.ident.as_deref(), Some("1f"));
//! assert_eq!(req.method, "__getitem__");
//! assert_eq!(req.args, vec![Value::String("k".into())]);
//! # Ok::<(), multiprocess::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::reduction::pickle::{check_expansion, walk, HashableValue, Value};
pub use crate::reduction::pickle::{MAX_DEPTH, MAX_INT_DIGITS};

// Opcodes (see CPython's Lib/pickletools.py for the catalogue).
const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT: u8 = b'J';
const BINFLOAT: u8 = b'G';
const BINUNICODE: u8 = b'X';
const BINBYTES: u8 = b'B';
const EMPTY_LIST: u8 = b']';
const EMPTY_DICT: u8 = b'}';
const EMPTY_TUPLE: u8 = b')';
const MARK: u8 = b'(';
const APPENDS: u8 = b'e';
const SETITEMS: u8 = b'u';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const GLOBAL: u8 = b'c';
const REDUCE: u8 = b'R';
const NEWOBJ: u8 = 0x81;
const BUILD: u8 = b'b';

/// A request as the server reads it: `(ident, methodname, args, kwds)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The object id for method calls; `None` for control requests (`create`, `incref`…).
    pub ident: Option<String>,
    /// The function or method name.
    pub method: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments (string keys only, as Python requires).
    pub kwargs: Vec<(String, Value)>,
}

/// Decodes one request message. Anything that is not a 4-tuple of (str or None, str,
/// tuple, dict with str keys) is an [`Error::Protocol`]; a pickle that cannot be read
/// (bad bytes, class instances) is an [`Error::Serialization`]. Never panics.
pub fn decode_request(bytes: &[u8]) -> Result<Request> {
    let v = decode_value(bytes)?;
    let Value::Tuple(mut parts) = v else {
        return Err(Error::protocol("a manager request must be a 4-tuple"));
    };
    if parts.len() != 4 {
        return Err(Error::protocol("a manager request must be a 4-tuple"));
    }
    let kw = parts.pop().unwrap_or(Value::None);
    let args = parts.pop().unwrap_or(Value::None);
    let method = parts.pop().unwrap_or(Value::None);
    let ident = parts.pop().unwrap_or(Value::None);
    let ident = match ident {
        Value::None => None,
        Value::String(s) => Some(s),
        _ => return Err(Error::protocol("request ident must be a str or None")),
    };
    let Value::String(method) = method else {
        return Err(Error::protocol("request method name must be a str"));
    };
    let args = match args {
        Value::Tuple(a) | Value::List(a) => a,
        _ => return Err(Error::protocol("request args must be a tuple")),
    };
    let kwargs = match kw {
        Value::Dict(d) => {
            let mut out = Vec::with_capacity(d.len());
            for (k, v) in d {
                match k {
                    HashableValue::String(k) => out.push((k, v)),
                    _ => return Err(Error::protocol("keyword names must be str")),
                }
            }
            out
        }
        Value::None => Vec::new(),
        _ => return Err(Error::protocol("request kwds must be a dict")),
    };
    Ok(Request {
        ident,
        method,
        args,
        kwargs,
    })
}

/// Encodes a request `(ident, method, args, kwargs)` as a CPython client would send it.
pub fn encode_request(
    ident: Option<&str>,
    method: &str,
    args: &[Value],
    kwargs: &[(String, Value)],
) -> Vec<u8> {
    let mut w = Writer::new();
    w.op(MARK);
    match ident {
        Some(i) => w.str(i),
        None => w.op(NONE),
    }
    w.str(method);
    w.tuple(args);
    w.op(EMPTY_DICT);
    if !kwargs.is_empty() {
        w.op(MARK);
        for (k, v) in kwargs {
            w.str(k);
            w.value(v);
        }
        w.op(SETITEMS);
    }
    w.op(TUPLE);
    w.stop()
}

/// A reply as a client reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `('#RETURN', value)`.
    Return(Value),
    /// `('#ERROR', exception)`: the referent raised `module.name(*args)`.
    Error {
        /// The exception class's module (`builtins`, `queue`…).
        module: String,
        /// The exception class name (`KeyError`…).
        name: String,
        /// The exception's arguments, where they could be decoded.
        args: Vec<Value>,
    },
    /// `('#PROXY', (exposed, Token(typeid, address, id)))`: the result is a new shared
    /// object with one reference, held for the caller.
    Proxy {
        /// Methods the new object exposes.
        exposed: Vec<String>,
        /// Its type id (`Iterator`…).
        typeid: String,
        /// Its id on the server.
        ident: String,
    },
    /// `('#TRACEBACK', text)` or `('#UNSERIALIZABLE', text)`: the server failed.
    Traceback(String),
}

/// Decodes one reply message (from a Rust or a CPython server).
pub fn decode_reply(bytes: &[u8]) -> Result<Reply> {
    // The common replies ('#RETURN' with plain data, '#TRACEBACK') take the fast path.
    if let Some(Value::Tuple(mut t)) = super::fast::decode(bytes) {
        if t.len() == 2 {
            let payload = t.pop().unwrap_or(Value::None);
            match (&t[0], payload) {
                (Value::String(k), v) if k == "#RETURN" => return Ok(Reply::Return(v)),
                (Value::String(k), Value::String(text))
                    if k == "#TRACEBACK" || k == "#UNSERIALIZABLE" =>
                {
                    return Ok(Reply::Traceback(text))
                }
                _ => {}
            }
        }
    }
    let depth = check_expansion(bytes)?;
    let strings = leading_strings(bytes, 3);
    let kind = strings
        .first()
        .cloned()
        .ok_or_else(|| Error::protocol("a manager reply must start with its kind"))?;
    if kind == "#ERROR" {
        let module = strings.get(1).cloned().unwrap_or_default();
        let name = strings.get(2).cloned().unwrap_or_default();
        // With keep_restore_state, `Class(*args)` decodes as the args tuple.
        let args = match unpickle(
            bytes,
            serde_pickle::DeOptions::new()
                .keep_restore_state()
                .replace_unresolved_globals(),
            depth,
        ) {
            Ok(Value::Tuple(mut t)) if t.len() == 2 => match t.pop() {
                Some(Value::Tuple(a)) => a,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        return Ok(Reply::Error { module, name, args });
    }
    let v = unpickle(bytes, serde_pickle::DeOptions::new(), depth)?;
    let Value::Tuple(mut t) = v else {
        return Err(Error::protocol("a manager reply must be a 2-tuple"));
    };
    if t.len() != 2 {
        return Err(Error::protocol("a manager reply must be a 2-tuple"));
    }
    let payload = t.pop().unwrap_or(Value::None);
    match kind.as_str() {
        "#RETURN" => Ok(Reply::Return(payload)),
        "#TRACEBACK" | "#UNSERIALIZABLE" => Ok(Reply::Traceback(match payload {
            Value::String(s) => s,
            other => format!("{other:?}"),
        })),
        "#PROXY" => {
            // (exposed, Token) with Token decoded as its state tuple (typeid, address, id).
            let bad = || Error::protocol("malformed #PROXY reply");
            let Value::Tuple(mut p) = payload else {
                return Err(bad());
            };
            if p.len() != 2 {
                return Err(bad());
            }
            let token = p.pop().ok_or_else(bad)?;
            let exposed = p.pop().ok_or_else(bad)?;
            let exposed = match exposed {
                Value::Tuple(e) | Value::List(e) => e
                    .into_iter()
                    .filter_map(|x| match x {
                        Value::String(s) => Some(s),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let (typeid, ident) = match token {
                Value::Tuple(t) | Value::List(t) if t.len() == 3 => match (&t[0], &t[2]) {
                    (Value::String(a), Value::String(b)) => (a.clone(), b.clone()),
                    _ => return Err(bad()),
                },
                _ => return Err(bad()),
            };
            Ok(Reply::Proxy {
                exposed,
                typeid,
                ident,
            })
        }
        other => Err(Error::protocol(format!(
            "unrecognized manager reply kind {other:?}"
        ))),
    }
}

/// Decodes one plain-data pickle (protocols 0–5) into a [`Value`]: a fast decoder for
/// the usual case, and otherwise serde-pickle after a check that memo references do not
/// expand the message beyond a size limit ("billion laughs"). Class instances are an
/// [`Error::Serialization`]; the expansion check failing is an [`Error::Protocol`].
pub fn decode_value(bytes: &[u8]) -> Result<Value> {
    if let Some(v) = super::fast::decode(bytes) {
        return Ok(v);
    }
    let depth = check_expansion(bytes)?;
    match unpickle(bytes, serde_pickle::DeOptions::new(), depth) {
        // Slices, proxies, arrays, or a class that is refused by name.
        Err(Error::Serialization(e)) if e.contains("unresolved global") => {
            super::pyobj::decode_checked(bytes)
        }
        other => other,
    }
}

/// serde-pickle on a pickle without class references (see `pyobj`), after the same
/// expansion and depth checks as every other request.
pub(crate) fn unpickle_plain(bytes: &[u8]) -> Result<Value> {
    let depth = check_expansion(bytes)?;
    unpickle(bytes, serde_pickle::DeOptions::new(), depth)
}

/// [`walk`], for `pyobj`'s rewriting.
pub(crate) fn walk_opcodes(b: &[u8], visit: impl FnMut(u8, &[u8]) -> bool) -> bool {
    walk(b, visit)
}

/// serde-pickle with `options`, on a pickle [`check_expansion`] accepted with nesting
/// `depth` (see [`unpickle`](crate::reduction::pickle::unpickle)).
fn unpickle(bytes: &[u8], options: serde_pickle::DeOptions, depth: u32) -> Result<Value> {
    crate::reduction::pickle::unpickle(bytes, depth, &|b| {
        serde_pickle::value_from_slice(b, options.clone())
    })
}

/// The fast decoder alone: `None` when the pickle is outside its subset (memo
/// references, class references, big integers…). For differential tests and fuzzing.
#[doc(hidden)]
pub fn decode_value_fast(bytes: &[u8]) -> Option<Value> {
    super::fast::decode(bytes)
}

/// The server's `repr` of a decoded value (bounded for big integers). For fuzzing.
#[doc(hidden)]
pub fn repr_value(v: &Value) -> String {
    super::objects::repr(v)
}

/// `('#RETURN', value)`.
pub fn encode_return(value: &Value) -> Vec<u8> {
    let mut w = Writer::new();
    w.str("#RETURN");
    w.value(value);
    w.op(TUPLE2);
    w.stop()
}

/// `('#ERROR', module.name(*args))`: the client raises that exception.
pub fn encode_error(module: &str, name: &str, args: &[Value]) -> Vec<u8> {
    let mut w = Writer::new();
    w.str("#ERROR");
    w.global(module, name);
    w.tuple(args);
    w.op(REDUCE);
    w.op(TUPLE2);
    w.stop()
}

/// `(kind, text)` with kind `#TRACEBACK`: the client raises `RemoteError(text)`.
pub fn encode_traceback(text: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.str("#TRACEBACK");
    w.str(text);
    w.op(TUPLE2);
    w.stop()
}

/// `('#PROXY', (exposed, Token(typeid, address, ident)))`.
pub fn encode_proxy(exposed: &[&str], typeid: &str, address: &Value, ident: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.str("#PROXY");
    let names: Vec<Value> = exposed
        .iter()
        .map(|s| Value::String(s.to_string()))
        .collect();
    w.tuple(&names);
    w.global("multiprocessing.managers", "Token");
    w.op(EMPTY_TUPLE);
    w.op(NEWOBJ);
    w.str(typeid);
    w.value(address);
    w.str(ident);
    w.op(TUPLE3);
    w.op(BUILD);
    w.op(TUPLE2);
    w.op(TUPLE2);
    w.stop()
}

/// A protocol-3 pickle writer for plain values.
struct Writer {
    out: Vec<u8>,
}

impl Writer {
    fn new() -> Writer {
        Writer {
            out: vec![PROTO, 3],
        }
    }

    fn op(&mut self, op: u8) {
        self.out.push(op);
    }

    fn stop(mut self) -> Vec<u8> {
        self.out.push(STOP);
        self.out
    }

    fn str(&mut self, s: &str) {
        self.out.push(BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(GLOBAL);
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }

    fn tuple(&mut self, items: &[Value]) {
        match items.len() {
            0 => self.op(EMPTY_TUPLE),
            1..=3 => {
                for v in items {
                    self.value(v);
                }
                self.op([TUPLE1, TUPLE2, TUPLE3][items.len() - 1]);
            }
            _ => {
                self.op(MARK);
                for v in items {
                    self.value(v);
                }
                self.op(TUPLE);
            }
        }
    }

    fn int(&mut self, i: i64) {
        if let Ok(small) = i32::try_from(i) {
            self.out.push(BININT);
            self.out.extend_from_slice(&small.to_le_bytes());
        } else {
            // LONG1: little-endian two's complement.
            let bytes = i.to_le_bytes();
            self.out.push(0x8a);
            self.out.push(8);
            self.out.extend_from_slice(&bytes);
        }
    }

    fn set(&mut self, items: &std::collections::BTreeSet<HashableValue>, frozen: bool) {
        self.global("builtins", if frozen { "frozenset" } else { "set" });
        self.op(EMPTY_LIST);
        if !items.is_empty() {
            self.op(MARK);
            for h in items {
                self.hashable(h);
            }
            self.op(APPENDS);
        }
        self.op(TUPLE1);
        self.op(REDUCE);
    }

    fn bigint(&mut self, v: &Value) {
        // serde-pickle writes a big int as a single LONG1/LONG4 opcode without memo:
        // splice it in without its PROTO header and STOP.
        match serde_pickle::value_to_vec(v, serde_pickle::SerOptions::new()) {
            Ok(b) if b.len() > 3 => self.out.extend_from_slice(&b[2..b.len() - 1]),
            _ => self.op(NONE),
        }
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::None => self.op(NONE),
            Value::Bool(b) => self.op(if *b { NEWTRUE } else { NEWFALSE }),
            Value::I64(i) => self.int(*i),
            Value::Int(_) => self.bigint(v),
            Value::F64(f) => {
                self.op(BINFLOAT);
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Bytes(b) => {
                self.op(BINBYTES);
                self.out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                self.out.extend_from_slice(b);
            }
            Value::String(s) => self.str(s),
            Value::List(items) => {
                self.op(EMPTY_LIST);
                if !items.is_empty() {
                    self.op(MARK);
                    for i in items {
                        self.value(i);
                    }
                    self.op(APPENDS);
                }
            }
            Value::Tuple(items) => {
                if let Some((a, z, st)) = super::pyobj::slice(v) {
                    self.global("builtins", "slice");
                    self.tuple(&[a.clone(), z.clone(), st.clone()]);
                    self.op(REDUCE);
                } else if let Some(p) = super::pyobj::proxy(v) {
                    self.rebuild_proxy(&p);
                } else {
                    self.tuple(items)
                }
            }
            Value::Set(s) => self.set(s, false),
            Value::FrozenSet(s) => self.set(s, true),
            Value::Dict(d) => {
                self.op(EMPTY_DICT);
                if !d.is_empty() {
                    self.op(MARK);
                    for (k, v) in d {
                        self.hashable(k);
                        self.value(v);
                    }
                    self.op(SETITEMS);
                }
            }
        }
    }

    /// `RebuildProxy(cls, Token(typeid, address, id), 'pickle', {'exposed': ..})`, as
    /// CPython pickles a proxy.
    fn rebuild_proxy(&mut self, p: &super::pyobj::ProxyRef) {
        self.global("multiprocessing.managers", "RebuildProxy");
        self.op(MARK);
        self.global(&p.class.0, &p.class.1);
        self.global("multiprocessing.managers", "Token");
        self.op(EMPTY_TUPLE);
        self.op(NEWOBJ);
        self.str(&p.typeid);
        self.value(&p.address);
        self.str(&p.ident);
        self.op(TUPLE3);
        self.op(BUILD);
        self.str("pickle");
        self.op(EMPTY_DICT);
        if p.exposed != Value::None {
            self.str("exposed");
            self.value(&p.exposed);
            self.op(b's');
        }
        self.op(TUPLE);
        self.op(REDUCE);
    }

    fn hashable(&mut self, h: &HashableValue) {
        match h {
            HashableValue::None => self.op(NONE),
            HashableValue::Bool(b) => self.op(if *b { NEWTRUE } else { NEWFALSE }),
            HashableValue::I64(i) => self.int(*i),
            HashableValue::Int(_) => self.bigint(&h.clone().into_value()),
            HashableValue::F64(f) => {
                self.op(BINFLOAT);
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            HashableValue::Bytes(b) => {
                self.op(BINBYTES);
                self.out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                self.out.extend_from_slice(b);
            }
            HashableValue::String(s) => self.str(s),
            HashableValue::Tuple(items) => {
                self.op(MARK);
                for i in items {
                    self.hashable(i);
                }
                self.op(TUPLE);
            }
            HashableValue::FrozenSet(s) => self.set(s, true),
        }
    }
}

/// The first `n` text constants of a pickle, in stream order (module and class names of
/// `GLOBAL` count as two). Used to learn an exception's class, which serde-pickle
/// discards.
fn leading_strings(b: &[u8], n: usize) -> Vec<String> {
    let mut out = Vec::new();
    walk(b, |op, arg| {
        match op {
            0x8c | b'X' | 0x8d | b'V' => out.push(String::from_utf8_lossy(arg).into_owned()),
            b'c' | b'i' => {
                for part in arg.splitn(2, |&c| c == b'\n') {
                    out.push(String::from_utf8_lossy(part).into_owned());
                }
            }
            _ => {}
        }
        out.len() < n
    });
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_cpython_keyerror_reply() {
        // Spec §5.3 capture: ('#ERROR', KeyError('missing')) from CPython 3.11.
        let frame = [
            0x80, 0x04, 0x95, 0x32, 0, 0, 0, 0, 0, 0, 0, 0x8c, 0x06, b'#', b'E', b'R', b'R', b'O',
            b'R', 0x94, 0x8c, 0x08, b'b', b'u', b'i', b'l', b't', b'i', b'n', b's', 0x94, 0x8c,
            0x08, b'K', b'e', b'y', b'E', b'r', b'r', b'o', b'r', 0x94, 0x93, 0x94, 0x8c, 0x07,
            b'm', b'i', b's', b's', b'i', b'n', b'g', 0x94, 0x85, 0x94, 0x52, 0x94, 0x86, 0x94,
            0x2e,
        ];
        assert_eq!(
            decode_reply(&frame).unwrap(),
            Reply::Error {
                module: "builtins".into(),
                name: "KeyError".into(),
                args: vec![Value::String("missing".into())],
            }
        );
    }

    #[test]
    fn captured_cpython_getitem_request() {
        let frame = [
            0x80, 0x04, 0x95, 0x29, 0, 0, 0, 0, 0, 0, 0, 0x28, 0x8c, 0x0c, b'7', b'f', b'3', b'0',
            b'f', b'4', b'a', b'b', b'0', b'8', b'c', b'0', 0x94, 0x8c, 0x0b, b'_', b'_', b'g',
            b'e', b't', b'i', b't', b'e', b'm', b'_', b'_', 0x94, 0x8c, 0x01, b'k', 0x94, 0x85,
            0x94, 0x7d, 0x94, 0x74, 0x94, 0x2e,
        ];
        let r = decode_request(&frame).unwrap();
        assert_eq!(r.ident.as_deref(), Some("7f30f4ab08c0"));
        assert_eq!(r.method, "__getitem__");
        assert_eq!(r.args, vec![Value::String("k".into())]);
    }

    #[test]
    fn round_trips() {
        let req = encode_request(
            None,
            "create",
            &[Value::String("dict".into())],
            &[("a".into(), Value::I64(1 << 40))],
        );
        let r = decode_request(&req).unwrap();
        assert_eq!(r.ident, None);
        assert_eq!(r.kwargs, vec![("a".into(), Value::I64(1 << 40))]);
        let e = encode_error("builtins", "IndexError", &[Value::String("x".into())]);
        assert!(
            matches!(decode_reply(&e).unwrap(), Reply::Error { name, .. } if name == "IndexError")
        );
        let p = encode_proxy(
            &["__next__"],
            "Iterator",
            &Value::String("/tmp/s".into()),
            "a1",
        );
        assert_eq!(
            decode_reply(&p).unwrap(),
            Reply::Proxy {
                exposed: vec!["__next__".into()],
                typeid: "Iterator".into(),
                ident: "a1".into()
            }
        );
    }

    #[test]
    fn memo_bomb_is_refused_quickly() {
        // [[]] then 60 times: t = (t, t), memoized — 2^60 nodes if expanded.
        let mut p = vec![0x80, 4, b']', 0x94];
        for i in 0..60u32 {
            p.push(b'j');
            p.extend_from_slice(&i.to_le_bytes());
            p.push(b'j');
            p.extend_from_slice(&i.to_le_bytes());
            p.extend_from_slice(&[0x86, 0x94]);
        }
        // Wrap as a request (None, 'x', (bomb,), {}).
        let mut req = vec![0x80, 4, b'(', b'N', 0x8c, 1, b'x'];
        req.extend_from_slice(&p[2..]);
        req.extend_from_slice(&[0x85, b'}', b't', b'.']);
        let t = std::time::Instant::now();
        let err = decode_request(&req).unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err:?}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // Moderate sharing is fine: the same string referenced 1000 times.
        let mut ok = vec![
            0x80, 4, b'(', b'N', 0x8c, 1, b'x', b']', 0x94, b'(', 0x8c, 1, b'v', 0x94,
        ];
        for _ in 0..1000 {
            ok.extend_from_slice(&[b'h', 1]);
        }
        ok.extend_from_slice(&[b'e', 0x85, b'}', b't', b'.']);
        let r = decode_request(&ok).unwrap();
        assert!(matches!(&r.args[0], Value::List(l) if l.len() == 1001));
    }

    /// `(None, 'x', (payload,), {})` around raw opcodes.
    fn wrap(payload: &[u8]) -> Vec<u8> {
        let mut req = vec![0x80, 4, b'(', b'N', 0x8c, 1, b'x'];
        req.extend_from_slice(payload);
        req.extend_from_slice(&[0x85, b'}', b't', b'.']);
        req
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused_by_both_decoders() {
        let nested = |depth: usize, memo: bool| {
            let mut p = vec![b']'; depth];
            p.extend(std::iter::repeat_n(b'a', depth - 1));
            if memo {
                // A memo reference sends it to the general decoder.
                p.extend_from_slice(&[0x94, b'0', b'h', 0]);
            }
            wrap(&p)
        };
        for memo in [false, true] {
            let err = decode_request(&nested(100_000, memo)).unwrap_err();
            assert!(
                matches!(err, Error::Protocol(ref m) if m.contains("nested")),
                "{err:?}"
            );
            // The request's tuple and its args tuple are two levels.
            let ok = decode_request(&nested(MAX_DEPTH as usize - 2, memo)).unwrap();
            assert_eq!(ok.args.len(), 1);
            assert!(decode_request(&nested(MAX_DEPTH as usize - 1, memo)).is_err());
        }
    }

    #[test]
    fn growth_after_a_memo_reference_is_refused() {
        // L memoized, referenced from P 1000 times, then grown through a reference.
        let mut p = vec![b']', b'q', 0, b']', b'('];
        for _ in 0..1000 {
            p.extend_from_slice(&[b'h', 0]);
        }
        p.extend_from_slice(&[b'e', b'h', 0, b'(', b'K', 1, b'e', b'0', 0x86]);
        let err = decode_request(&wrap(&p)).unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ref m) if m.contains("changed")),
            "{err:?}"
        );
        // A big string referenced many times counts its bytes each time.
        let mut p = vec![b'X'];
        p.extend_from_slice(&(100_000u32).to_le_bytes());
        p.extend(std::iter::repeat_n(b'x', 100_000));
        p.extend_from_slice(&[0x94, b'(']);
        for _ in 0..1000 {
            p.extend_from_slice(&[b'h', 0]);
        }
        p.push(b'l');
        assert!(decode_request(&wrap(&p)).is_err());
    }

    #[test]
    fn text_integers_are_limited_to_4300_digits() {
        for op in [b'I', b'L'] {
            let mut p = vec![op];
            p.extend(std::iter::repeat_n(b'7', MAX_INT_DIGITS + 1));
            p.push(b'\n');
            let err = decode_request(&wrap(&p)).unwrap_err();
            assert!(
                matches!(err, Error::Protocol(ref m) if m.contains("4300")),
                "{err:?}"
            );
        }
        let mut p = vec![b'L'];
        p.extend(std::iter::repeat_n(b'7', MAX_INT_DIGITS));
        p.extend_from_slice(b"L\n");
        assert!(matches!(
            &decode_request(&wrap(&p)).unwrap().args[0],
            Value::Int(_)
        ));
    }

    #[test]
    fn opcodes_the_check_cannot_follow_are_refused() {
        // OBJ (`o`) is followed; an unknown opcode or truncated input is an error.
        assert!(decode_request(&wrap(b"N(No")).is_ok());
        assert!(matches!(
            decode_request(&wrap(&[0xff])),
            Err(Error::Serialization(_))
        ));
        assert!(decode_request(&[0x80, 4, b'(', b'X', 9, 0]).is_err());
    }

    #[test]
    fn unorderable_keys_are_an_error_not_a_panic() {
        // The input the fuzzer found: a frozenset mixing NaN-like floats and big ints.
        let crash: &[u8] = &[
            128, 3, 40, 88, 2, 0, 0, 0, 49, 102, 85, 85, 85, 136, 136, 136, 136, 136, 136, 136,
            136, 136, 136, 136, 136, 136, 136, 136, 255, 255, 255, 255, 255, 255, 255, 255, 255,
            255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 0, 0, 0, 255,
            255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
            255, 71, 71, 71, 93, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71,
            71, 71, 71, 71, 24, 0, 0, 0, 0, 0, 0, 0, 71, 255, 255, 255, 225, 71, 71, 71, 71, 71,
            71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71,
            71, 71, 71, 71, 71, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136,
            136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136,
            136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136,
            136, 136, 136, 133, 133, 133, 50, 50, 50, 50, 50, 145, 50, 50, 50, 50, 50, 50, 50, 50,
            50, 50, 50, 50, 46,
        ];
        assert!(decode_request(crash).is_err());
        // Must return (either way) rather than panic.
        let _ = decode_reply(crash);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_request(b"").is_err());
        assert!(decode_request(b"\x80\x03N.").is_err());
        assert!(decode_reply(b"\x80\x03N.").is_err());
    }
}
