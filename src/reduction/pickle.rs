//! Python's pickle format, for exchanging plain data with CPython peers.
//!
//! CPython's `Connection.send(obj)` sends `pickle.dumps(obj)` in one frame and `recv()`
//! unpickles one. [`Connection::send_pickle`](crate::Connection::send_pickle) and
//! [`Connection::recv_pickle`](crate::Connection::recv_pickle) do the same from Rust, with
//! the [`serde-pickle`](https://docs.rs/serde-pickle) crate: we write protocol 3 (every
//! Python 3 reads it) and read protocols 0–5. Nothing is ever executed while decoding.
//!
//! | Python | Rust |
//! |---|---|
//! | `None` | `()`, `Option::None` |
//! | `bool`, `int` (within `i64`), `float`, `str` | `bool`, integers, `f64`, `String` |
//! | `bytes` | [`serde_bytes::ByteBuf`] (a plain `Vec<u8>` is a *list* of ints) |
//! | `list` / `tuple` | `Vec<T>` / Rust tuples |
//! | `dict` | `HashMap`/`BTreeMap`, or a `#[derive(Deserialize)]` struct (string keys) |
//! | anything | [`Value`], the dynamic form ([`Connection::recv_pickle_value`](crate::Connection::recv_pickle_value)) |
//!
//! Class instances (exceptions, `datetime`, user classes) cannot be decoded: that is a
//! [`Error::Serialization`], and the connection stays usable for the next message.
//!
//! Pickles are hostile input. Before decoding, [`from_slice`] and [`value_from_slice`]
//! check that containers nest at most [`MAX_DEPTH`] levels, that text integers have at
//! most [`MAX_INT_DIGITS`] digits, and that memo references (one object referenced many
//! times, a "billion laughs") do not expand the value beyond `32 × its length + 64 MiB`
//! bytes; a pickle over a limit is an [`Error::Protocol`]. Decoding, dropping, cloning and
//! re-encoding a value that passed stay within a bounded stack.
//!
//! ```
//! use multiprocess::reduction::pickle::{self, ByteBuf, Value};
//! let (a, b) = multiprocess::pipe()?;
//! a.send_pickle(&("hi", 1, ByteBuf::from(vec![0u8, 255])))?;
//! // The bytes on the wire are a protocol-3 pickle, as Python's `pickle.loads` reads them.
//! let raw = b.recv_bytes()?;
//! assert_eq!(&raw[..2], b"\x80\x03");
//! let v: Value = pickle::value_from_slice(&raw)?;
//! assert_eq!(v, Value::Tuple(vec![
//!     Value::String("hi".into()), Value::I64(1), Value::Bytes(vec![0, 255]),
//! ]));
//! # Ok::<(), multiprocess::Error>(())
//! ```

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

mod limits;

pub(crate) use limits::{check_expansion, contained, unpickle, walk};
pub use limits::{MAX_DEPTH, MAX_INT_DIGITS};

pub use serde_bytes::{ByteBuf, Bytes};
pub use serde_pickle::{HashableValue, Value};

/// Pickles `value` with protocol 3.
pub fn to_vec<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_pickle::to_vec(value, serde_pickle::SerOptions::new()).map_err(Error::serialization)
}

/// Unpickles a typed value (protocols 0–5).
///
/// A pickle nested more than a few levels is parsed on a helper thread with a deep
/// stack; `T` is then built on the caller's thread, which recurses as deep as `T`'s own
/// shape (a recursive `T` up to [`MAX_DEPTH`] levels).
///
/// # Errors
/// [`Error::Protocol`] for a pickle over a limit (nesting, expansion, digits; see the
/// module documentation), [`Error::Serialization`] for one that is malformed or does not
/// match `T`.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let depth = check_expansion(bytes)?;
    if depth <= limits::SHALLOW {
        return contained(|| serde_pickle::from_slice(bytes, serde_pickle::DeOptions::new()));
    }
    // Deep: parse on a helper thread with a deep stack (see `unpickle`), then build `T`
    // here (`T` need not be `Send`); that recursion follows `T`'s own shape, so it goes
    // deep only for a recursive `T`, and never past MAX_DEPTH.
    let value = value_from_slice(bytes)?;
    contained(|| serde_pickle::from_value(value))
}

/// Pickles a dynamic [`Value`] with protocol 3 (the way to send sets, big integers…).
///
/// A value nested more than a few levels is encoded on a helper thread with a deep stack,
/// so whatever [`value_from_slice`] decoded can be sent back from any thread.
///
/// # Errors
/// [`Error::Serialization`] for a value nested deeper than [`MAX_DEPTH`] (no receiver
/// here would accept it).
pub fn value_to_vec(value: &Value) -> Result<Vec<u8>> {
    let encode = || {
        serde_pickle::value_to_vec(value, serde_pickle::SerOptions::new())
            .map_err(Error::serialization)
    };
    match limits::depth_of(value, MAX_DEPTH) {
        d if d > MAX_DEPTH => Err(Error::Serialization(format!(
            "the value is nested deeper than {MAX_DEPTH} levels"
        ))),
        d if d > limits::SHALLOW => limits::on_deep_stack(encode),
        _ => encode(),
    }
}

/// Unpickles any plain-data pickle into a dynamic [`Value`].
///
/// # Errors
/// [`Error::Protocol`] for a pickle over a limit (nesting, expansion, digits; see the
/// module documentation), [`Error::Serialization`] for one that is malformed or holds a
/// class instance.
pub fn value_from_slice(bytes: &[u8]) -> Result<Value> {
    let depth = check_expansion(bytes)?;
    unpickle(bytes, depth, &|b| {
        serde_pickle::value_from_slice(b, serde_pickle::DeOptions::new())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_cpython_protocol_4() {
        // send(('hi', 1)) from CPython 3.11 (spec §2.8 frame 8).
        let p = [
            0x80, 0x04, 0x95, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0x8c, 0x02, 0x68, 0x69, 0x94, 0x4b, 0x01,
            0x86, 0x94, 0x2e,
        ];
        let (s, n): (String, i64) = from_slice(&p).unwrap();
        assert_eq!((s.as_str(), n), ("hi", 1));
    }

    /// `depth` nested lists, as raw protocol-2 opcodes.
    fn nested(depth: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', depth));
        p.extend(std::iter::repeat_n(b'a', depth - 1));
        p.push(b'.');
        p
    }

    #[test]
    fn deep_values_round_trip_on_a_small_stack_and_deeper_ones_are_refused() {
        let limit = MAX_DEPTH as usize;
        assert!(matches!(
            value_from_slice(&nested(limit + 1)),
            Err(Error::Protocol(_))
        ));
        // Decoded, re-encoded, compared and dropped on a thread with a 256 KiB stack.
        let p = nested(limit);
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let v = value_from_slice(&p).unwrap();
                assert_eq!(limits::depth_of(&v, MAX_DEPTH), MAX_DEPTH);
                let again = value_to_vec(&v).unwrap();
                assert_eq!(
                    limits::depth_of(&value_from_slice(&again).unwrap(), 1000),
                    MAX_DEPTH
                );
                // One level more than any receiver accepts: refused by the sender.
                let deeper = Value::List(vec![v]);
                assert!(matches!(
                    value_to_vec(&deeper),
                    Err(Error::Serialization(_))
                ));
            })
            .unwrap()
            .join()
            .unwrap();
        // Sets and dict keys nest too.
        let key = HashableValue::Tuple(vec![HashableValue::Tuple(vec![HashableValue::None])]);
        let d = Value::Dict([(key, Value::List(vec![]))].into_iter().collect());
        assert_eq!(limits::depth_of(&d, MAX_DEPTH), 3);
        assert_eq!(limits::depth_of(&d, 1), 2);
    }

    #[test]
    fn mismatch_is_serialization_error() {
        let p = to_vec(&"text").unwrap();
        assert!(matches!(
            from_slice::<i32>(&p),
            Err(Error::Serialization(_))
        ));
        assert!(matches!(
            value_from_slice(b"garbage"),
            Err(Error::Serialization(_))
        ));
    }
}
