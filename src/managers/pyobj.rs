//! The few Python objects a manager message may carry beyond plain data: slices
//! (`builtins.slice`), proxies (`multiprocessing.managers.RebuildProxy` with a `Token`),
//! arrays (`array._array_reconstructor`) and the container globals serde-pickle reads
//! itself (`set`, `frozenset`, `bytearray`, `_codecs.encode`, `list`).
//!
//! serde-pickle refuses any other class reference. For a pickle it refused, the decoder
//! here rewrites the opcodes that name or call a class (`GLOBAL`, `STACK_GLOBAL`,
//! `REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `BUILD`) into tagged tuples, lets serde-pickle read
//! that plain-data pickle, and then resolves the tagged tuples it knows. Nothing is ever
//! executed; any other class or function is an error naming it ("a Rust server cannot run
//! Python code").
//!
//! Inside the server a slice and a proxy are [`Value`]s of a reserved shape (a tuple whose
//! first item is a tag string that starts with a NUL byte); [`slice`] and [`proxy`]
//! recognise them, and the reply encoder writes them back as the Python objects.

use crate::error::{Error, Result};
use crate::reduction::pickle::Value;

const SLICE_TAG: &str = "\0mp:slice";
const PROXY_TAG: &str = "\0mp:proxy";
const GLOBAL_TAG: &str = "\0mp:global";
const TOKEN_TAG: &str = "\0mp:token";
const R_TAG: &str = "\0mp:R";
const N_TAG: &str = "\0mp:N";
const B_TAG: &str = "\0mp:B";
const G_TAG: &str = "\0mp:G";

/// The most items a `range` argument may expand to.
const MAX_RANGE: i128 = 1 << 20;

/// How deep the tagged structure may nest before it is refused.
const MAX_DEPTH: usize = 200;

/// A proxy stored in (or passed to) a shared object: what its `Token` names, plus the
/// proxy class to rebuild it with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProxyRef {
    pub typeid: String,
    pub address: Value,
    pub ident: String,
    /// `(module, name)` of the proxy class (`multiprocessing.managers`, `ListProxy`).
    pub class: (String, String),
    /// `exposed` for `AutoProxy`, else `None`.
    pub exposed: Value,
}

/// A `slice(start, stop, step)` as a [`Value`] of the reserved shape.
pub(crate) fn slice_value(start: Value, stop: Value, step: Value) -> Value {
    Value::Tuple(vec![Value::String(SLICE_TAG.into()), start, stop, step])
}

/// The parts of a slice value.
pub(crate) fn slice(v: &Value) -> Option<(&Value, &Value, &Value)> {
    match v {
        Value::Tuple(t) if t.len() == 4 && matches!(&t[0], Value::String(s) if s == SLICE_TAG) => {
            Some((&t[1], &t[2], &t[3]))
        }
        _ => None,
    }
}

/// A proxy as a [`Value`] of the reserved shape.
pub(crate) fn proxy_value(p: ProxyRef) -> Value {
    Value::Tuple(vec![
        Value::String(PROXY_TAG.into()),
        Value::String(p.typeid),
        p.address,
        Value::String(p.ident),
        Value::String(p.class.0),
        Value::String(p.class.1),
        p.exposed,
    ])
}

/// The proxy a value of the reserved shape stands for.
pub(crate) fn proxy(v: &Value) -> Option<ProxyRef> {
    let Value::Tuple(t) = v else { return None };
    match t.as_slice() {
        [Value::String(tag), Value::String(typeid), address, Value::String(ident), Value::String(m), Value::String(n), exposed]
            if tag == PROXY_TAG =>
        {
            Some(ProxyRef {
                typeid: typeid.clone(),
                address: address.clone(),
                ident: ident.clone(),
                class: (m.clone(), n.clone()),
                exposed: exposed.clone(),
            })
        }
        _ => None,
    }
}

/// Every proxy inside `v` (depth-first), for reference counting.
pub(crate) fn proxies_in(v: &Value, out: &mut Vec<ProxyRef>) {
    fn go(v: &Value, out: &mut Vec<ProxyRef>, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        if let Some(p) = proxy(v) {
            out.push(p);
            return;
        }
        match v {
            Value::List(items) | Value::Tuple(items) => {
                items.iter().for_each(|i| go(i, out, depth + 1))
            }
            Value::Dict(d) => d.iter().for_each(|(_, i)| go(i, out, depth + 1)),
            _ => {}
        }
    }
    go(v, out, 0)
}

/// Decodes a pickle that names classes: see the module docs.
pub(crate) fn decode(bytes: &[u8]) -> Result<Value> {
    let rewritten = rewrite(bytes)?;
    let raw = super::wire::unpickle_plain(&rewritten)?;
    resolve(raw, 0)
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn tag(out: &mut Vec<u8>, tuple_op: u8, t: &str) {
    out.push(tuple_op);
    push_str(out, t);
    out.push(0x86); // TUPLE2
}

/// Rewrites a pickle into one without class references and without memo: each stack
/// item is kept as the opcodes that build it, a memo reference is replaced by a copy of
/// those opcodes (serde-pickle's memo bookkeeping fails on references nested inside
/// shared tuples, as proxies' tokens are), and the opcodes that name or call a class
/// become tagged tuples. The copies are bounded by a budget proportional to the input.
fn rewrite(b: &[u8]) -> Result<Vec<u8>> {
    enum Slot {
        Mark,
        Frag(usize),
    }
    let budget = b.len().saturating_mul(16) + (1 << 20);
    let mut used = 0usize;
    let mut arena: Vec<Vec<u8>> = Vec::new();
    let mut stack: Vec<Slot> = Vec::new();
    let mut memo: std::collections::HashMap<u64, usize> = Default::default();
    let mut pos = 0usize;
    let mut bad: Option<String> = None;
    let mut result: Option<usize> = None;
    let base = b.as_ptr() as usize;
    let complete = super::wire::walk_opcodes(b, |op, arg| {
        let arg_start = arg.as_ptr() as usize - base;
        let line = matches!(
            op,
            b'c' | b'i' | b'I' | b'L' | b'F' | b'S' | b'V' | b'p' | b'g' | b'P'
        );
        let end = arg_start + arg.len() + usize::from(line);
        let raw = &b[pos..end];
        pos = end;
        let mut fail = |what: &str| {
            bad = Some(what.to_string());
            false
        };
        macro_rules! pop {
            () => {
                match stack.pop() {
                    Some(Slot::Frag(i)) => arena[i].clone(),
                    _ => return fail("stack underflow"),
                }
            };
        }
        macro_rules! pop_mark {
            () => {{
                let Some(m) = stack.iter().rposition(|s| matches!(s, Slot::Mark)) else {
                    return fail("no mark");
                };
                let mut items = Vec::new();
                for s in stack.drain(m..).skip(1) {
                    if let Slot::Frag(i) = s {
                        items.extend_from_slice(&arena[i]);
                    }
                }
                items
            }};
        }
        macro_rules! push {
            ($v:expr) => {{
                let v: Vec<u8> = $v;
                used = used.saturating_add(v.len());
                if used > budget {
                    return fail("a pickle that expands beyond its size limit");
                }
                arena.push(v);
                stack.push(Slot::Frag(arena.len() - 1));
            }};
        }
        macro_rules! top {
            () => {
                match stack.last() {
                    Some(Slot::Frag(i)) => *i,
                    _ => return fail("stack underflow"),
                }
            };
        }
        let le = |s: &[u8]| s.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64);
        match op {
            0x80 | 0x95 => {}
            b'.' => {
                result = match stack.pop() {
                    Some(Slot::Frag(i)) => Some(i),
                    _ => return fail("empty pickle"),
                };
                return false;
            }
            b'(' => stack.push(Slot::Mark),
            0x94 => {
                let i = top!();
                memo.insert(memo.len() as u64, i);
            }
            b'p' | b'q' | b'r' => {
                let id = if op == b'p' {
                    match std::str::from_utf8(arg)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                    {
                        Some(id) => id,
                        None => return fail("bad PUT"),
                    }
                } else {
                    le(arg)
                };
                let i = top!();
                memo.insert(id, i);
            }
            b'g' | b'h' | b'j' => {
                let id = if op == b'g' {
                    match std::str::from_utf8(arg)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                    {
                        Some(id) => id,
                        None => return fail("bad GET"),
                    }
                } else {
                    le(arg)
                };
                match memo.get(&id) {
                    Some(&i) => push!(arena[i].clone()),
                    None => return fail("missing memo"),
                }
            }
            b'c' => {
                let mut parts = arg.splitn(2, |&c| c == b'\n');
                let m = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                let n = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                let mut v = Vec::new();
                push_str(&mut v, &m);
                push_str(&mut v, &n);
                tag(&mut v, 0x86, G_TAG);
                push!(v)
            }
            0x93 | b'R' | 0x81 | b'b' | 0x92 => {
                let (n, t) = match op {
                    0x93 => (2, G_TAG),
                    b'R' => (2, R_TAG),
                    0x81 => (2, N_TAG),
                    b'b' => (2, B_TAG),
                    _ => (3, N_TAG),
                };
                let mut parts = Vec::new();
                for _ in 0..n {
                    parts.push(pop!());
                }
                let mut v: Vec<u8> = parts.into_iter().rev().flatten().collect();
                tag(&mut v, if n == 2 { 0x86 } else { 0x87 }, t);
                push!(v)
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut parts = Vec::new();
                for _ in 0..n {
                    parts.push(pop!());
                }
                let mut v: Vec<u8> = parts.into_iter().rev().flatten().collect();
                v.push(op);
                push!(v)
            }
            b't' | b'l' | b'd' | 0x91 => {
                let mut v = vec![b'('];
                v.extend(pop_mark!());
                v.push(op);
                push!(v)
            }
            b'a' | b's' => {
                let n = if op == b'a' { 1 } else { 2 };
                let mut parts = Vec::new();
                for _ in 0..n {
                    parts.push(pop!());
                }
                let i = top!();
                let add: Vec<u8> = parts.into_iter().rev().flatten().collect();
                used = used.saturating_add(add.len() + 1);
                arena[i].extend(add);
                arena[i].push(op);
            }
            b'e' | b'u' | 0x90 => {
                let items = pop_mark!();
                let i = top!();
                used = used.saturating_add(items.len() + 2);
                arena[i].push(b'(');
                arena[i].extend(items);
                arena[i].push(op);
            }
            b'0' => {
                stack.pop();
            }
            b'1' => {
                let _ = pop_mark!();
            }
            b'2' => {
                let i = top!();
                push!(arena[i].clone())
            }
            b'i' | b'o' | b'P' | b'Q' | 0x82 | 0x83 | 0x84 | 0x97 | 0x98 => {
                return fail(&format!(
                    "pickle opcode {op:#04x} (an old-style, external or out-of-band object)"
                ))
            }
            _ => push!(raw.to_vec()),
        }
        if used > budget {
            return fail("a pickle that expands beyond its size limit");
        }
        true
    });
    if let Some(what) = bad {
        return Err(Error::Serialization(format!("cannot decode {what}")));
    }
    match (complete, result) {
        (true, Some(i)) => {
            let mut out = vec![0x80, 4];
            out.extend_from_slice(&arena[i]);
            out.push(b'.');
            Ok(out)
        }
        _ => Err(Error::Serialization("truncated or unknown pickle".into())),
    }
}

fn is_tag(v: &Value, t: &str) -> bool {
    matches!(v, Value::String(s) if s == t)
}

fn global(m: &str, n: &str) -> Value {
    Value::Tuple(vec![
        Value::String(GLOBAL_TAG.into()),
        Value::String(m.into()),
        Value::String(n.into()),
    ])
}

fn as_global(v: &Value) -> Option<(&str, &str)> {
    match v {
        Value::Tuple(t) if t.len() == 3 && is_tag(&t[0], GLOBAL_TAG) => match (&t[1], &t[2]) {
            (Value::String(m), Value::String(n)) => Some((m, n)),
            _ => None,
        },
        _ => None,
    }
}

fn refuse(m: &str, n: &str) -> Error {
    Error::Serialization(format!(
        "{m}.{n} is a Python class or function: a Rust manager server cannot run Python code"
    ))
}

fn resolve(v: Value, depth: usize) -> Result<Value> {
    if depth > MAX_DEPTH {
        return Err(Error::Serialization("pickle nests too deeply".into()));
    }
    let d = depth + 1;
    match v {
        Value::Tuple(mut t)
            if t.len() == 2 && matches!(&t[1], Value::String(s) if s.starts_with("\0mp:")) =>
        {
            let Value::String(kind) = t.pop().unwrap_or(Value::None) else {
                unreachable!()
            };
            let inner = t.pop().unwrap_or(Value::None);
            let Value::Tuple(parts) = inner else {
                return Err(Error::Serialization("malformed class reference".into()));
            };
            let mut parts = parts.into_iter();
            let mut next = || parts.next().unwrap_or(Value::None);
            match kind.as_str() {
                G_TAG => match (next(), next()) {
                    (Value::String(m), Value::String(n)) => Ok(global(&m, &n)),
                    _ => Err(Error::Serialization("malformed class reference".into())),
                },
                R_TAG => {
                    let f = resolve(next(), d)?;
                    let args = resolve(next(), d)?;
                    reduce(&f, args)
                }
                N_TAG => {
                    let cls = resolve(next(), d)?;
                    match as_global(&cls) {
                        Some(("multiprocessing.managers", "Token")) => {
                            Ok(Value::Tuple(vec![Value::String(TOKEN_TAG.into())]))
                        }
                        Some((m, n)) => Err(refuse(m, n)),
                        None => Err(Error::Serialization("NEWOBJ of a non-class".into())),
                    }
                }
                B_TAG => {
                    let obj = resolve(next(), d)?;
                    let state = resolve(next(), d)?;
                    match (&obj, state) {
                        (Value::Tuple(t), Value::Tuple(s))
                            if t.len() == 1 && is_tag(&t[0], TOKEN_TAG) && s.len() == 3 =>
                        {
                            let mut s = s;
                            s.insert(0, Value::String(TOKEN_TAG.into()));
                            Ok(Value::Tuple(s))
                        }
                        _ => Err(Error::Serialization(
                            "cannot decode an object's state (only a Token's)".into(),
                        )),
                    }
                }
                _ => Err(Error::Serialization("malformed tagged pickle".into())),
            }
        }
        Value::Tuple(t) => Ok(Value::Tuple(
            t.into_iter()
                .map(|i| resolve(i, d))
                .collect::<Result<_>>()?,
        )),
        Value::List(t) => Ok(Value::List(
            t.into_iter()
                .map(|i| resolve(i, d))
                .collect::<Result<_>>()?,
        )),
        Value::Dict(mut items) => {
            // In place: rebuilding the map would sort its keys again, and their order is
            // not total (NaN, floats next to big integers), which makes the sort panic
            // (found by fuzzing: fuzz/regressions/manager_request/nan-dict-key-rebuild).
            for v in items.values_mut() {
                *v = resolve(std::mem::replace(v, Value::None), d)?;
            }
            Ok(Value::Dict(items))
        }
        other => Ok(other),
    }
}

/// Rejects class references left over as plain values (a class passed as an argument).
fn finished(v: &Value) -> Result<()> {
    if let Some((m, n)) = as_global(v) {
        return Err(refuse(m, n));
    }
    if matches!(v, Value::Tuple(t) if t.first().is_some_and(|x| is_tag(x, TOKEN_TAG))) {
        return Err(Error::Serialization("a bare Token".into()));
    }
    Ok(())
}

fn reduce(f: &Value, args: Value) -> Result<Value> {
    let Some((m, n)) = as_global(f) else {
        return Err(Error::Serialization("call of a non-global".into()));
    };
    let Value::Tuple(args) = args else {
        return Err(Error::Serialization(
            "call arguments must be a tuple".into(),
        ));
    };
    let bad = || Error::Serialization(format!("bad arguments to {m}.{n}"));
    match (m, n) {
        ("builtins", "slice") | ("__builtin__", "slice") => {
            for a in &args {
                finished(a)?;
            }
            let mut a = args.into_iter();
            let (x, y, z) = (a.next(), a.next(), a.next());
            Ok(match (x, y, z) {
                (Some(stop), None, None) => slice_value(Value::None, stop, Value::None),
                (Some(s), Some(e), st) => slice_value(s, e, st.unwrap_or(Value::None)),
                _ => return Err(bad()),
            })
        }
        ("builtins", "set") | ("builtins", "frozenset") => {
            let items = match args.into_iter().next() {
                None => Vec::new(),
                Some(Value::List(l)) | Some(Value::Tuple(l)) => l,
                _ => return Err(bad()),
            };
            let set = items
                .into_iter()
                .map(|v| v.into_hashable().map_err(|_| bad()))
                .collect::<Result<_>>()?;
            Ok(if n == "set" {
                Value::Set(set)
            } else {
                Value::FrozenSet(set)
            })
        }
        ("builtins", "bytearray") => match args.into_iter().next() {
            None => Ok(Value::Bytes(Vec::new())),
            Some(Value::Bytes(b)) => Ok(Value::Bytes(b)),
            Some(Value::String(s)) => Ok(Value::Bytes(s.chars().map(|c| c as u8).collect())),
            _ => Err(bad()),
        },
        ("_codecs", "encode") => match args.into_iter().next() {
            Some(Value::String(s)) => Ok(Value::Bytes(s.chars().map(|c| c as u8).collect())),
            _ => Err(bad()),
        },
        ("builtins", "list") => match args.into_iter().next() {
            None => Ok(Value::List(Vec::new())),
            Some(Value::List(l)) | Some(Value::Tuple(l)) => Ok(Value::List(l)),
            _ => Err(bad()),
        },
        ("array", "_array_reconstructor") => array(args).ok_or_else(bad),
        ("array", "array") => match <[Value; 2]>::try_from(args) {
            Ok([_, Value::List(items)]) => Ok(Value::List(items)),
            // array.array(typecode, machine bytes): this machine's (little-endian,
            // LP64) item sizes, as the pickling CPython on the same host wrote them.
            Ok([Value::String(code), Value::Bytes(b)]) => {
                let mformat = match code.as_str() {
                    "B" => 0,
                    "b" => 1,
                    "H" => 2,
                    "h" => 4,
                    "I" => 6,
                    "i" => 8,
                    "L" | "Q" => 10,
                    "l" | "q" => 12,
                    "f" => 14,
                    "d" => 16,
                    "u" => 20,
                    _ => return Err(bad()),
                };
                array(vec![
                    Value::None,
                    Value::None,
                    Value::I64(mformat),
                    Value::Bytes(b),
                ])
                .ok_or_else(bad)
            }
            _ => Err(bad()),
        },
        ("builtins", "range") => {
            let ints = args
                .iter()
                .map(|a| match a {
                    Value::I64(i) => Some(*i),
                    _ => None,
                })
                .collect::<Option<Vec<i64>>>()
                .ok_or_else(bad)?;
            let (start, stop, step) = match ints.as_slice() {
                [stop] => (0, *stop, 1),
                [a, b] => (*a, *b, 1),
                [a, b, c] if *c != 0 => (*a, *b, *c),
                _ => return Err(bad()),
            };
            let n = if step > 0 {
                (stop as i128 - start as i128 + step as i128 - 1) / step as i128
            } else {
                (start as i128 - stop as i128 - step as i128 - 1) / -(step as i128)
            }
            .max(0);
            if n > MAX_RANGE {
                return Err(Error::Serialization(format!(
                    "range of {n} items is larger than a message may expand to"
                )));
            }
            Ok(Value::List(
                (0..n as i64)
                    .map(|k| Value::I64(start + k * step))
                    .collect(),
            ))
        }
        ("multiprocessing.managers", "RebuildProxy") => {
            let mut a = args.into_iter();
            let (Some(cls), Some(token), _, kwds) = (a.next(), a.next(), a.next(), a.next()) else {
                return Err(bad());
            };
            let Some((cm, cn)) = as_global(&cls) else {
                return Err(bad());
            };
            let Value::Tuple(t) = token else {
                return Err(bad());
            };
            let [tag, Value::String(typeid), address, Value::String(ident)] =
                <[Value; 4]>::try_from(t).map_err(|_| bad())?
            else {
                return Err(bad());
            };
            if !is_tag(&tag, TOKEN_TAG) {
                return Err(bad());
            }
            let exposed = match kwds {
                Some(Value::Dict(d)) => d
                    .into_iter()
                    .find(|(k, _)| matches!(k, crate::reduction::pickle::HashableValue::String(s) if s == "exposed"))
                    .map(|(_, v)| v)
                    .unwrap_or(Value::None),
                _ => Value::None,
            };
            Ok(proxy_value(ProxyRef {
                typeid,
                address,
                ident,
                class: (cm.to_string(), cn.to_string()),
                exposed,
            }))
        }
        _ => Err(refuse(m, n)),
    }
}

/// `array._array_reconstructor(array.array, typecode, mformat_code, bytes)` → a list.
fn array(args: Vec<Value>) -> Option<Value> {
    let [_, _, Value::I64(code), Value::Bytes(b)] = <[Value; 4]>::try_from(args).ok()? else {
        return None;
    };
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| c.try_into().unwrap_or([0; N]))
    }
    let items: Vec<Value> = match code {
        0 => b.iter().map(|&x| Value::I64(x as i64)).collect(),
        1 => b.iter().map(|&x| Value::I64(x as i8 as i64)).collect(),
        2 => chunks::<2>(&b)
            .map(|c| Value::I64(u16::from_le_bytes(c) as i64))
            .collect(),
        4 => chunks::<2>(&b)
            .map(|c| Value::I64(i16::from_le_bytes(c) as i64))
            .collect(),
        6 => chunks::<4>(&b)
            .map(|c| Value::I64(u32::from_le_bytes(c) as i64))
            .collect(),
        8 => chunks::<4>(&b)
            .map(|c| Value::I64(i32::from_le_bytes(c) as i64))
            .collect(),
        10 => chunks::<8>(&b)
            .map(|c| {
                let x = u64::from_le_bytes(c);
                i64::try_from(x)
                    .map(Value::I64)
                    .unwrap_or(Value::F64(x as f64))
            })
            .collect(),
        12 => chunks::<8>(&b)
            .map(|c| Value::I64(i64::from_le_bytes(c)))
            .collect(),
        14 => chunks::<4>(&b)
            .map(|c| Value::F64(f32::from_le_bytes(c) as f64))
            .collect(),
        16 => chunks::<8>(&b)
            .map(|c| Value::F64(f64::from_le_bytes(c)))
            .collect(),
        20 => chunks::<4>(&b)
            .map(|c| {
                let ch = char::from_u32(u32::from_le_bytes(c)).unwrap_or('\u{fffd}');
                Value::String(ch.to_string())
            })
            .collect(),
        _ => return None,
    };
    Some(Value::List(items))
}

/// Decodes and checks that no bare class reference is left at the top.
pub(crate) fn decode_checked(bytes: &[u8]) -> Result<Value> {
    let v = decode(bytes)?;
    check_tree(&v, 0)?;
    Ok(v)
}

fn check_tree(v: &Value, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::Serialization("pickle nests too deeply".into()));
    }
    finished(v)?;
    if proxy(v).is_some() || slice(v).is_some() {
        return Ok(());
    }
    match v {
        Value::List(items) | Value::Tuple(items) => {
            items.iter().try_for_each(|i| check_tree(i, depth + 1))
        }
        Value::Dict(d) => d.iter().try_for_each(|(_, i)| check_tree(i, depth + 1)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpython_slice_and_proxy() {
        // pickle.dumps((slice(1, 5, None),), 4)
        let b = b"\x80\x04\x95\x1b\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x05slice\x94\x93\x94K\x01K\x05N\x87\x94R\x94\x85\x94.";
        let v = decode_checked(b).unwrap();
        let Value::Tuple(t) = v else { panic!() };
        let (a, z, s) = slice(&t[0]).unwrap();
        assert_eq!((a, z, s), (&Value::I64(1), &Value::I64(5), &Value::None));
    }

    #[test]
    fn other_classes_are_refused_by_name() {
        // pickle.dumps(print, 4)
        let b = b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x05print\x94\x93\x94.";
        let e = decode_checked(b).unwrap_err().to_string();
        assert!(
            e.contains("builtins.print") && e.contains("Python code"),
            "{e}"
        );
    }

    #[test]
    fn cpython_array_slice_assignment() {
        // ForkingPickler.dumps(('__setitem__', (slice(0, 2, None), array.array('i', [7, 8]))))
        let b = b"\x80\x04\x95z\x00\x00\x00\x00\x00\x00\x00\x8c\x0b__setitem__\x94\x8c\x08builtins\x94\x8c\x05slice\x94\x93\x94K\x00K\x02N\x87\x94R\x94\x8c\x05array\x94\x8c\x14_array_reconstructor\x94\x93\x94(\x8c\x05array\x94\x8c\x05array\x94\x93\x94\x8c\x01i\x94K\x08C\x08\x07\x00\x00\x00\x08\x00\x00\x00\x94t\x94R\x94\x86\x94\x86\x94.";
        let v = decode_checked(b).unwrap();
        let Value::Tuple(t) = v else { panic!("{v:?}") };
        let Value::Tuple(args) = &t[1] else { panic!() };
        assert!(slice(&args[0]).is_some());
        assert_eq!(args[1], Value::List(vec![Value::I64(7), Value::I64(8)]));
    }
}
