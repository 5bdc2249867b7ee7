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
use crate::reduction::pickle::{HashableValue, Value};

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
    let v = serde_pickle::value_from_slice(bytes, serde_pickle::DeOptions::new())
        .map_err(Error::serialization)?;
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
    let strings = leading_strings(bytes, 3);
    let kind = strings
        .first()
        .cloned()
        .ok_or_else(|| Error::protocol("a manager reply must start with its kind"))?;
    if kind == "#ERROR" {
        let module = strings.get(1).cloned().unwrap_or_default();
        let name = strings.get(2).cloned().unwrap_or_default();
        // With keep_restore_state, `Class(*args)` decodes as the args tuple.
        let args = match serde_pickle::value_from_slice(
            bytes,
            serde_pickle::DeOptions::new()
                .keep_restore_state()
                .replace_unresolved_globals(),
        ) {
            Ok(Value::Tuple(mut t)) if t.len() == 2 => match t.pop() {
                Some(Value::Tuple(a)) => a,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        return Ok(Reply::Error { module, name, args });
    }
    let v = serde_pickle::value_from_slice(bytes, serde_pickle::DeOptions::new())
        .map_err(Error::serialization)?;
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
            Value::Tuple(items) => self.tuple(items),
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
/// `GLOBAL` count as two). Reads just enough of the opcode stream; stops at anything it
/// does not know. Used to learn an exception's class, which serde-pickle discards.
fn leading_strings(b: &[u8], n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0usize;
    let take = |i: &mut usize, len: usize| -> Option<&[u8]> {
        let end = i.checked_add(len)?;
        let s = b.get(*i..end)?;
        *i = end;
        Some(s)
    };
    let len_le = |s: &[u8]| -> usize {
        let mut v = 0usize;
        for (k, x) in s.iter().enumerate().take(8) {
            v |= (*x as usize) << (8 * k);
        }
        v
    };
    while out.len() < n && i < b.len() {
        let op = b[i];
        i += 1;
        let fixed = match op {
            0x80 | b'K' | b'q' | b'h' | 0x82 => 1,
            b'M' | 0x83 => 2,
            b'J' | b'r' | b'j' | 0x84 => 4,
            b'G' | 0x95 => 8,
            b'N' | b')' | b']' | b'}' | b'(' | b'e' | b'u' | b's' | b't' | 0x85 | 0x86 | 0x87
            | 0x88 | 0x89 | 0x94 | b'a' | b'R' | 0x81 | b'b' | b'0' | b'2' | b'1' | b'l' | b'd'
            | 0x8f | 0x90 | 0x91 | 0x92 | 0x97 | 0x98 => 0,
            0x8c | b'C' | b'U' | 0x8a => {
                let Some(l) = take(&mut i, 1) else { break };
                let l = l[0] as usize;
                let Some(s) = take(&mut i, l) else { break };
                if op == 0x8c {
                    out.push(String::from_utf8_lossy(s).into_owned());
                }
                continue;
            }
            b'X' | b'B' | b'T' | 0x8b => {
                let Some(l) = take(&mut i, 4) else { break };
                let l = len_le(l);
                let Some(s) = take(&mut i, l) else { break };
                if op == b'X' {
                    out.push(String::from_utf8_lossy(s).into_owned());
                }
                continue;
            }
            0x8d | 0x8e | 0x96 => {
                let Some(l) = take(&mut i, 8) else { break };
                let l = len_le(l);
                let Some(s) = take(&mut i, l) else { break };
                if op == 0x8d {
                    out.push(String::from_utf8_lossy(s).into_owned());
                }
                continue;
            }
            b'c' | b'i' => {
                for _ in 0..2 {
                    let Some(nl) = b[i.min(b.len())..].iter().position(|&c| c == b'\n') else {
                        return out;
                    };
                    out.push(String::from_utf8_lossy(&b[i..i + nl]).into_owned());
                    i += nl + 1;
                }
                continue;
            }
            b'I' | b'L' | b'F' | b'S' | b'V' | b'p' | b'g' | b'P' => {
                let Some(nl) = b[i.min(b.len())..].iter().position(|&c| c == b'\n') else {
                    break;
                };
                if op == b'V' {
                    out.push(String::from_utf8_lossy(&b[i..i + nl]).into_owned());
                }
                i += nl + 1;
                continue;
            }
            _ => break,
        };
        if take(&mut i, fixed).is_none() {
            break;
        }
    }
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
    fn garbage_is_an_error() {
        assert!(decode_request(b"").is_err());
        assert!(decode_request(b"\x80\x03N.").is_err());
        assert!(decode_reply(b"\x80\x03N.").is_err());
    }
}
