//! Limits on what a pickle from a peer may make the decoder do, checked before
//! serde-pickle runs: nesting depth, memo-aliased expansion, text-integer digits. Used by
//! [`value_from_slice`](super::value_from_slice), [`from_slice`](super::from_slice) and
//! the manager protocol's decoders alike.

use crate::error::{Error, Result};
use serde_pickle::{HashableValue, Value};

/// The deepest nesting of containers a decoded pickle may have (for a manager request,
/// counting the request's own tuples). CPython 3.11's pickler cannot write a list nested
/// 500 deep: it raises `RecursionError`. Everything that walks a [`Value`] recursively — dropping,
/// cloning, comparing, `repr`, encoding — stays within a bounded stack because of it.
pub const MAX_DEPTH: u32 = 500;

/// The most digits a text integer (`INT`/`LONG` opcodes, protocols 0–1) may have:
/// CPython's `sys.get_int_max_str_digits()` default. Decimal conversion is quadratic.
pub const MAX_INT_DIGITS: usize = 4300;

/// How many bytes a message may expand to beyond `32 × its length` once decoded:
/// memo references (`GET`) repeat objects, so a small pickle can describe an
/// exponentially large value (a "billion laughs").
const EXPANSION_ALLOWANCE: u64 = 64 << 20;

/// Roughly what one decoded [`Value`] costs besides its payload (its enum slot).
const NODE: u64 = std::mem::size_of::<Value>() as u64;

/// One object of the simulated pickle machine.
#[derive(Clone, Copy)]
struct Node {
    /// Bytes of the fully resolved value (memo references expanded).
    weight: u64,
    /// Container nesting (0 for scalars).
    depth: u32,
    /// Referenced through the memo: its weight is then final, so mutating it is refused.
    shared: bool,
}

/// Why [`check_expansion`] stopped.
enum Stop {
    /// Over a limit: refused.
    Refused(&'static str),
    /// Not a pickle the decoder would accept.
    Malformed(&'static str),
}

/// Checks, before anything is decoded, that a pickle stays within the decoder's limits:
/// at most [`MAX_DEPTH`] nested containers, text integers of at most [`MAX_INT_DIGITS`]
/// digits, and a decoded size — memo references expanded — of at most
/// `32 × len + 64 MiB` bytes. Simulates the pickle machine with one small record per
/// object; memo entries name the object itself, so growth after memoization is
/// accounted, and mutating an object after a memo reference to it was taken (which
/// only recursive structures need, and those cannot be decoded) is refused.
///
/// Returns the deepest nesting seen. A limit exceeded is an [`Error::Protocol`];
/// opcodes the decoder would not accept are an [`Error::Serialization`].
pub(crate) fn check_expansion(b: &[u8]) -> Result<u32> {
    let limit = (b.len() as u64).saturating_mul(NODE) + EXPANSION_ALLOWANCE;
    let mut nodes: Vec<Node> = Vec::new();
    // The decoder's stack and the stacks saved by MARK, of node indices.
    let mut stack: Vec<usize> = Vec::new();
    let mut saved: Vec<Vec<usize>> = Vec::new();
    let mut memo: std::collections::HashMap<u64, usize> = Default::default();
    let mut total = 0u64;
    let mut stopped: Option<Stop> = None;
    let mut finished = false;
    let mut deepest = 0u32;
    let le = |s: &[u8]| s.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64);
    let parse_idx =
        |arg: &[u8]| -> Option<u64> { std::str::from_utf8(arg).ok()?.trim().parse().ok() };
    let walked = walk(b, |op, arg| {
        use Stop::{Malformed, Refused};
        let r = (|| -> std::result::Result<(), Stop> {
            let underflow = Malformed("stack underflow");
            let new = |nodes: &mut Vec<Node>, weight: u64, depth: u32| {
                nodes.push(Node {
                    weight,
                    depth,
                    shared: false,
                });
                nodes.len() - 1
            };
            // A container holding `items`, from scratch.
            let container = |nodes: &mut Vec<Node>, items: &[usize]| {
                let mut n = Node {
                    weight: NODE,
                    depth: 1,
                    shared: false,
                };
                for &i in items {
                    n.weight = n.weight.saturating_add(nodes[i].weight);
                    n.depth = n.depth.max(nodes[i].depth.saturating_add(1));
                }
                nodes.push(n);
                nodes.len() - 1
            };
            // Items added to the container `t` (APPEND, SETITEM…).
            let grow = |nodes: &mut Vec<Node>, t: usize, items: &[usize]| {
                if nodes[t].shared {
                    return Err(Refused(
                        "an object is changed after a memo reference to it was taken",
                    ));
                }
                for &i in items {
                    let (w, d) = (nodes[i].weight, nodes[i].depth);
                    let n = &mut nodes[t];
                    n.weight = n.weight.saturating_add(w);
                    n.depth = n.depth.max(d.saturating_add(1));
                }
                Ok(())
            };
            // The decoder copies a value here (DUP, PUT of a reference, REDUCE args).
            let copy = |nodes: &mut Vec<Node>, total: &mut u64, i: usize| {
                let mut n = nodes[i];
                *total = total.saturating_add(n.weight);
                n.shared = false;
                nodes.push(n);
                nodes.len() - 1
            };
            match op {
                0x80 | 0x95 | 0x97 | 0x98 => {}
                b'.' => {
                    finished = true;
                }
                b'(' => saved.push(std::mem::take(&mut stack)),
                b'a' => {
                    let x = stack.pop().ok_or(underflow)?;
                    let t = *stack.last().ok_or(Malformed("stack underflow"))?;
                    grow(&mut nodes, t, &[x])?;
                }
                b's' => {
                    let v = stack.pop().ok_or(underflow)?;
                    let k = stack.pop().ok_or(Malformed("stack underflow"))?;
                    let t = *stack.last().ok_or(Malformed("stack underflow"))?;
                    grow(&mut nodes, t, &[k, v])?;
                }
                b'e' | b'u' | 0x90 => {
                    let items = std::mem::replace(&mut stack, saved.pop().ok_or(underflow)?);
                    let t = *stack.last().ok_or(Malformed("stack underflow"))?;
                    grow(&mut nodes, t, &items)?;
                }
                b't' | b'l' | b'd' | 0x91 => {
                    let items = std::mem::replace(&mut stack, saved.pop().ok_or(underflow)?);
                    let n = container(&mut nodes, &items);
                    stack.push(n);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if stack.len() < n {
                        return Err(underflow);
                    }
                    let items = stack.split_off(stack.len() - n);
                    let t = container(&mut nodes, &items);
                    stack.push(t);
                }
                b']' | b'}' | b')' | 0x8f => {
                    let n = new(&mut nodes, NODE, 1);
                    stack.push(n);
                }
                b'0' => {
                    if stack.is_empty() {
                        stack = saved.pop().ok_or(underflow)?;
                    } else {
                        stack.pop();
                    }
                }
                b'1' => {
                    stack = saved.pop().ok_or(underflow)?;
                }
                b'2' => {
                    let t = *stack.last().ok_or(underflow)?;
                    let n = copy(&mut nodes, &mut total, t);
                    stack.push(n);
                }
                b'p' | b'q' | b'r' | 0x94 => {
                    let idx = match op {
                        b'p' => parse_idx(arg).ok_or(Malformed("bad memo index"))?,
                        0x94 => memo.len() as u64,
                        _ => le(arg),
                    };
                    let mut t = stack.pop().ok_or(underflow)?;
                    if nodes[t].shared {
                        // The decoder stores a copy of a referenced value.
                        t = copy(&mut nodes, &mut total, t);
                    }
                    memo.insert(idx, t);
                    stack.push(t);
                }
                b'g' | b'h' | b'j' => {
                    let idx = match op {
                        b'g' => parse_idx(arg).ok_or(Malformed("bad memo index"))?,
                        _ => le(arg),
                    };
                    let t = *memo.get(&idx).ok_or(Malformed("missing memo entry"))?;
                    nodes[t].shared = true;
                    total = total.saturating_add(nodes[t].weight);
                    stack.push(t);
                }
                0x93 => {
                    stack.pop().ok_or(underflow)?;
                    stack.pop().ok_or(Malformed("stack underflow"))?;
                    let n = new(&mut nodes, NODE, 0);
                    stack.push(n);
                }
                b'R' | 0x81 => {
                    let a = stack.pop().ok_or(underflow)?;
                    let f = stack.pop().ok_or(Malformed("stack underflow"))?;
                    // The decoder resolves (copies) the arguments.
                    total = total.saturating_add(nodes[a].weight);
                    let n = container(&mut nodes, &[a, f]);
                    stack.push(n);
                }
                0x92 => {
                    let k = stack.pop().ok_or(underflow)?;
                    let a = stack.pop().ok_or(Malformed("stack underflow"))?;
                    let f = stack.pop().ok_or(Malformed("stack underflow"))?;
                    let n = container(&mut nodes, &[k, a, f]);
                    stack.push(n);
                }
                b'i' => {
                    let items = std::mem::replace(&mut stack, saved.pop().ok_or(underflow)?);
                    let n = container(&mut nodes, &items);
                    stack.push(n);
                }
                b'o' => {
                    let items = std::mem::replace(&mut stack, saved.pop().ok_or(underflow)?);
                    stack.pop().ok_or(Malformed("stack underflow"))?;
                    let n = container(&mut nodes, &items);
                    stack.push(n);
                }
                b'b' => {
                    // The state replaces the object.
                    let st = stack.pop().ok_or(underflow)?;
                    stack.pop().ok_or(Malformed("stack underflow"))?;
                    stack.push(st);
                }
                b'I' | b'L' => {
                    let digits = arg.iter().filter(|c| c.is_ascii_digit()).count();
                    if digits > MAX_INT_DIGITS {
                        return Err(Refused(
                            "an integer has more than 4300 digits (CPython's limit)",
                        ));
                    }
                    let n = new(&mut nodes, NODE + arg.len() as u64 / 2, 0);
                    stack.push(n);
                }
                _ => {
                    // A scalar; its payload is its argument.
                    let n = new(&mut nodes, NODE + arg.len() as u64, 0);
                    stack.push(n);
                }
            }
            total = total.saturating_add(NODE);
            if let Some(&t) = stack.last() {
                deepest = deepest.max(nodes[t].depth);
                if nodes[t].depth > MAX_DEPTH {
                    return Err(Refused(
                        "containers are nested deeper than the limit (500 levels)",
                    ));
                }
                if nodes[t].weight > limit {
                    return Err(Refused(
                        "its memo references expand it beyond the size limit",
                    ));
                }
            }
            if total > limit {
                return Err(Refused(
                    "its memo references expand it beyond the size limit",
                ));
            }
            Ok(())
        })();
        match r {
            Ok(()) => !finished,
            Err(e) => {
                stopped = Some(e);
                false
            }
        }
    });
    match stopped {
        Some(Stop::Refused(why)) => Err(Error::protocol(format!("pickle refused: {why}"))),
        Some(Stop::Malformed(why)) => Err(Error::Serialization(format!("bad pickle: {why}"))),
        None if !walked => Err(Error::Serialization(
            "bad pickle: truncated, or an opcode this decoder does not support".into(),
        )),
        None if !finished => Err(Error::Serialization("bad pickle: no STOP opcode".into())),
        None => Ok(deepest),
    }
}

/// Nesting that serde-pickle may decode on any thread's stack; deeper pickles are
/// decoded on a helper thread with a deep stack.
pub(crate) const SHALLOW: u32 = 32;

/// Runs `decode` (serde-pickle) on `bytes`, which [`check_expansion`] accepted with
/// nesting `depth`, with its panics contained: serde-pickle sorts set and dict keys with
/// an ordering that is not total for NaN and for floats mixed with big integers, and the
/// standard sort panics on such an ordering (found by fuzzing). That input becomes an
/// [`Error::Serialization`] here (with `panic = "abort"` it would abort the process).
///
/// serde-pickle converts values recursively, with a large frame per level in
/// unoptimized builds: a value nested more than a few levels is decoded (and its
/// intermediate form dropped) on a helper thread with a stack sized for [`MAX_DEPTH`],
/// whatever the caller's thread has.
pub(crate) fn unpickle<R: Send>(
    bytes: &[u8],
    depth: u32,
    decode: &(dyn Fn(&[u8]) -> serde_pickle::Result<R> + Sync),
) -> Result<R> {
    if depth > SHALLOW {
        return on_deep_stack(|| unpickle(bytes, 0, decode));
    }
    contained(|| decode(bytes))
}

/// Runs `f` on a helper thread with a stack sized for [`MAX_DEPTH`] levels of
/// serde-pickle's recursion, and waits for it.
pub(crate) fn on_deep_stack<R: Send>(f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    const DEEP_STACK: usize = 64 << 20;
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("pickle-deep".into())
            .stack_size(DEEP_STACK)
            .spawn_scoped(s, f)
            .map_err(Error::Io)?
            .join()
            .unwrap_or_else(|_| Err(Error::Serialization("the pickle codec failed".into())))
    })
}

/// Runs serde-pickle with its panics contained (see [`unpickle`]).
pub(crate) fn contained<R>(decode: impl FnOnce() -> serde_pickle::Result<R>) -> Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(r) => r.map_err(Error::serialization),
        Err(_) => Err(Error::Serialization(
            "the pickle decoder failed on this input (unorderable set or dict keys)".into(),
        )),
    }
}

/// Walks a pickle's opcodes: calls `visit(opcode, argument)` for each, in order, until
/// `visit` returns false, the input ends, or an opcode this walker does not know comes
/// (then it returns false). Line-terminated arguments exclude the newline; `GLOBAL` and
/// `INST` give both lines joined by a newline.
pub(crate) fn walk(b: &[u8], mut visit: impl FnMut(u8, &[u8]) -> bool) -> bool {
    let mut i = 0usize;
    let le = |s: &[u8]| -> usize {
        let mut v = 0u64;
        for (k, x) in s.iter().enumerate().take(8) {
            v |= (*x as u64) << (8 * k);
        }
        usize::try_from(v).unwrap_or(usize::MAX)
    };
    let line = |i: usize| b.get(i..)?.iter().position(|&c| c == b'\n');
    while i < b.len() {
        let op = b[i];
        i += 1;
        let (start, len) = match op {
            0x80 | b'K' | b'q' | b'h' | 0x82 => (i, 1),
            b'M' | 0x83 => (i, 2),
            b'J' | b'r' | b'j' | 0x84 => (i, 4),
            b'G' | 0x95 => (i, 8),
            b'N' | b')' | b']' | b'}' | b'(' | b'e' | b'u' | b's' | b't' | 0x85 | 0x86 | 0x87
            | 0x88 | 0x89 | 0x94 | b'a' | b'R' | 0x81 | 0x92 | b'b' | b'0' | b'2' | b'1' | b'l'
            | b'd' | b'o' | 0x8f | 0x90 | 0x91 | 0x93 | 0x97 | 0x98 | b'.' => (i, 0),
            0x8c | b'C' | b'U' | 0x8a => match b.get(i) {
                Some(&l) => (i + 1, l as usize),
                None => return false,
            },
            b'X' | b'B' | b'T' | 0x8b => match b.get(i..i + 4) {
                Some(l) => (i + 4, le(l)),
                None => return false,
            },
            0x8d | 0x8e | 0x96 => match b.get(i..i + 8) {
                Some(l) => (i + 8, le(l)),
                None => return false,
            },
            b'c' | b'i' => {
                let Some(a) = line(i) else { return false };
                let Some(c) = line(i + a + 1) else {
                    return false;
                };
                (i, a + 1 + c)
            }
            b'I' | b'L' | b'F' | b'S' | b'V' | b'p' | b'g' | b'P' => {
                let Some(a) = line(i) else { return false };
                (i, a)
            }
            _ => return false,
        };
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let Some(arg) = b.get(start..end) else {
            return false;
        };
        if !visit(op, arg) {
            return true;
        }
        i = match op {
            b'c' | b'i' | b'I' | b'L' | b'F' | b'S' | b'V' | b'p' | b'g' | b'P' => end + 1,
            _ => end,
        };
        if op == b'.' {
            return true;
        }
    }
    true
}

/// How deeply `v` nests containers (a scalar is 0), counted without recursion, and
/// only up to `limit + 1`: the walk stops there.
pub(crate) fn depth_of(v: &Value, limit: u32) -> u32 {
    enum Item<'a> {
        V(&'a Value),
        H(&'a HashableValue),
    }
    let mut deepest = 0;
    let mut stack = vec![(Item::V(v), 0u32)];
    while let Some((item, d)) = stack.pop() {
        deepest = deepest.max(d);
        if deepest > limit {
            break;
        }
        match item {
            Item::V(Value::List(xs) | Value::Tuple(xs)) => {
                stack.extend(xs.iter().map(|x| (Item::V(x), d + 1)));
                deepest = deepest.max(d + 1);
            }
            Item::V(Value::Set(xs) | Value::FrozenSet(xs))
            | Item::H(HashableValue::FrozenSet(xs)) => {
                stack.extend(xs.iter().map(|x| (Item::H(x), d + 1)));
                deepest = deepest.max(d + 1);
            }
            Item::V(Value::Dict(m)) => {
                for (k, x) in m {
                    stack.push((Item::H(k), d + 1));
                    stack.push((Item::V(x), d + 1));
                }
                deepest = deepest.max(d + 1);
            }
            Item::H(HashableValue::Tuple(xs)) => {
                stack.extend(xs.iter().map(|x| (Item::H(x), d + 1)));
                deepest = deepest.max(d + 1);
            }
            _ => {}
        }
    }
    deepest.min(limit + 1)
}
