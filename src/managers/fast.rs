//! A fast decoder for the plain pickles that make up almost all manager traffic.
//!
//! It handles protocols 0–5 for None, bool, int (64-bit), float, str, bytes, list, tuple,
//! dict, set and frozenset, without the memo (`MEMOIZE`/`PUT` are skipped). Anything else
//! — a memo reference (`GET`, which can repeat objects), class references, big integers,
//! Python 2 strings — makes it give up (`None`), and the caller falls back to the
//! general decoder with its expansion check. It never panics and never allocates more
//! than the input describes.

use crate::reduction::pickle::Value;
use std::collections::{BTreeMap, BTreeSet};

enum Item {
    Mark,
    /// A value and its container nesting (0 for scalars).
    V(Value, u32),
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64)
}

/// Decodes `b`, or `None` if it uses anything outside the plain subset, is malformed, or
/// nests containers deeper than [`MAX_DEPTH`](super::wire::MAX_DEPTH) (the general
/// decoder's check then refuses it).
pub(crate) fn decode(b: &[u8]) -> Option<Value> {
    use super::wire::MAX_DEPTH;
    let mut stack: Vec<Item> = Vec::with_capacity(16);
    let mut i = 0usize;
    let take = |i: &mut usize, n: usize| -> Option<&[u8]> {
        let end = i.checked_add(n)?;
        let s = b.get(*i..end)?;
        *i = end;
        Some(s)
    };
    let line = |i: &mut usize| -> Option<&[u8]> {
        let rest = b.get(*i..)?;
        let n = rest.iter().position(|&c| c == b'\n')?;
        *i += n + 1;
        Some(&rest[..n])
    };
    // Values come off the stack with their nesting; the deepest is kept in `depth`.
    fn pop(stack: &mut Vec<Item>, depth: &mut u32) -> Option<Value> {
        match stack.pop()? {
            Item::V(v, d) => {
                *depth = (*depth).max(d);
                Some(v)
            }
            Item::Mark => None,
        }
    }
    fn pop_mark(stack: &mut Vec<Item>, depth: &mut u32) -> Option<Vec<Value>> {
        let m = stack.iter().rposition(|x| matches!(x, Item::Mark))?;
        let items = stack.split_off(m + 1);
        stack.pop();
        items
            .into_iter()
            .map(|x| match x {
                Item::V(v, d) => {
                    *depth = (*depth).max(d);
                    Some(v)
                }
                Item::Mark => None,
            })
            .collect()
    }
    // The container on top, and its nesting raised to hold items `depth` deep.
    fn top(stack: &mut [Item], depth: u32) -> Option<&mut Value> {
        match stack.last_mut()? {
            Item::V(v, d) => {
                *d = (*d).max(depth.checked_add(1)?);
                (*d <= MAX_DEPTH).then_some(v)
            }
            Item::Mark => None,
        }
    }
    fn extend(target: &mut Value, items: Vec<Value>) -> Option<()> {
        match target {
            Value::List(l) => l.extend(items),
            Value::Set(s) => {
                for x in items {
                    s.insert(x.into_hashable().ok()?);
                }
            }
            _ => return None,
        }
        Some(())
    }
    fn set_items(target: &mut Value, items: Vec<Value>) -> Option<()> {
        let Value::Dict(d) = target else { return None };
        if items.len() % 2 != 0 {
            return None;
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.insert(k.into_hashable().ok()?, v);
        }
        Some(())
    }
    let text = |s: &[u8]| -> Option<Value> {
        Some(Value::String(std::str::from_utf8(s).ok()?.to_owned()))
    };
    loop {
        let op = *b.get(i)?;
        i += 1;
        // The deepest nesting among the items this opcode takes from the stack.
        let mut depth = 0u32;
        let d = &mut depth;
        let v = match op {
            0x80 => {
                take(&mut i, 1)?;
                continue;
            }
            0x95 => {
                take(&mut i, 8)?;
                continue;
            }
            b'.' => {
                let v = pop(&mut stack, d)?;
                return stack.is_empty().then_some(v);
            }
            // Memo stores are skipped; memo loads give up.
            0x94 => continue,
            b'q' => {
                take(&mut i, 1)?;
                continue;
            }
            b'r' => {
                take(&mut i, 4)?;
                continue;
            }
            b'p' => {
                line(&mut i)?;
                continue;
            }
            b'(' => {
                stack.push(Item::Mark);
                continue;
            }
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'J' => Value::I64(i32::from_le_bytes(take(&mut i, 4)?.try_into().ok()?) as i64),
            b'K' => Value::I64(take(&mut i, 1)?[0] as i64),
            b'M' => Value::I64(le(take(&mut i, 2)?) as i64),
            0x8a => {
                let n = take(&mut i, 1)?[0] as usize;
                let bytes = take(&mut i, n)?;
                if n > 8 {
                    return None;
                }
                if n == 0 {
                    Value::I64(0)
                } else {
                    // Little-endian two's complement, sign-extended.
                    let mut buf = if bytes[n - 1] & 0x80 != 0 {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    Value::I64(i64::from_le_bytes(buf))
                }
            }
            b'I' => {
                let s = std::str::from_utf8(line(&mut i)?).ok()?;
                match s {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => Value::I64(s.parse().ok()?),
                }
            }
            b'G' => Value::F64(f64::from_be_bytes(take(&mut i, 8)?.try_into().ok()?)),
            b'F' => Value::F64(std::str::from_utf8(line(&mut i)?).ok()?.parse().ok()?),
            0x8c => {
                let n = take(&mut i, 1)?[0] as usize;
                text(take(&mut i, n)?)?
            }
            b'X' => {
                let n = le(take(&mut i, 4)?) as usize;
                text(take(&mut i, n)?)?
            }
            0x8d => {
                let n = usize::try_from(le(take(&mut i, 8)?)).ok()?;
                text(take(&mut i, n)?)?
            }
            b'C' => {
                let n = take(&mut i, 1)?[0] as usize;
                Value::Bytes(take(&mut i, n)?.to_vec())
            }
            b'B' => {
                let n = le(take(&mut i, 4)?) as usize;
                Value::Bytes(take(&mut i, n)?.to_vec())
            }
            0x8e | 0x96 => {
                let n = usize::try_from(le(take(&mut i, 8)?)).ok()?;
                Value::Bytes(take(&mut i, n)?.to_vec())
            }
            b']' => Value::List(Vec::new()),
            b')' => Value::Tuple(Vec::new()),
            b'}' => Value::Dict(BTreeMap::new()),
            0x8f => Value::Set(BTreeSet::new()),
            b'l' => Value::List(pop_mark(&mut stack, d)?),
            b't' => Value::Tuple(pop_mark(&mut stack, d)?),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return None;
                }
                let items = stack.split_off(stack.len() - n);
                Value::Tuple(
                    items
                        .into_iter()
                        .map(|x| match x {
                            Item::V(v, vd) => {
                                *d = (*d).max(vd);
                                Some(v)
                            }
                            Item::Mark => None,
                        })
                        .collect::<Option<Vec<_>>>()?,
                )
            }
            b'd' => {
                let mut dict = Value::Dict(BTreeMap::new());
                set_items(&mut dict, pop_mark(&mut stack, d)?)?;
                dict
            }
            0x91 => {
                let mut s = BTreeSet::new();
                for x in pop_mark(&mut stack, d)? {
                    s.insert(x.into_hashable().ok()?);
                }
                Value::FrozenSet(s)
            }
            b'a' => {
                let x = pop(&mut stack, d)?;
                extend(top(&mut stack, depth)?, vec![x])?;
                continue;
            }
            b'e' | 0x90 => {
                let items = pop_mark(&mut stack, d)?;
                extend(top(&mut stack, depth)?, items)?;
                continue;
            }
            b's' => {
                let v = pop(&mut stack, d)?;
                let k = pop(&mut stack, d)?;
                set_items(top(&mut stack, depth)?, vec![k, v])?;
                continue;
            }
            b'u' => {
                let items = pop_mark(&mut stack, d)?;
                set_items(top(&mut stack, depth)?, items)?;
                continue;
            }
            b'0' => {
                stack.pop()?;
                continue;
            }
            b'1' => {
                pop_mark(&mut stack, d)?;
                continue;
            }
            _ => return None,
        };
        let nesting = match v {
            Value::List(_)
            | Value::Tuple(_)
            | Value::Dict(_)
            | Value::Set(_)
            | Value::FrozenSet(_) => depth.checked_add(1)?,
            _ => 0,
        };
        if nesting > MAX_DEPTH {
            return None;
        }
        stack.push(Item::V(v, nesting));
    }
}
