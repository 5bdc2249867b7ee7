//! L1: how values travel between processes.
//!
//! Values are encoded with serde into one fast internal format (little-endian,
//! fixed-width, no tags; see `codec.rs`). Handles — a
//! [`Connection`](crate::Connection), and later queues, locks and shared memory — carry
//! file descriptors, which cannot be written as bytes: while a value is encoded, each
//! descriptor is set aside and only its index is written; the sender passes the
//! descriptors out of band (`SCM_RIGHTS`, as CPython's `reduction` does), and the receiver
//! hands them back to the decoder, which rebuilds the handle around a fresh descriptor.
//!
//! The [`fd`] module lets your own types carry descriptors the same way:
//!
//! ```
//! use std::os::fd::OwnedFd;
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Job {
//!     #[serde(with = "multiprocess::reduction::fd")]
//!     log: OwnedFd,
//!     lines: u32,
//! }
//! ```
//!
//! Native message layout: `u32` little-endian count of descriptors, then the encoded
//! bytes. Descriptors travel with the first bytes of the frame that carries them.
//!
//! # What is fast and what costs more
//! A `Vec` or slice of primitives (`u8`…`u128`, `i8`…`i128`, `f32`, `f64`, `bool`,
//! `char`), a `String`, `&str`, `serde_bytes::ByteBuf`/`&[u8]`, `bytes::Bytes` and
//! `Box<[u8]>` are moved as one copy wherever they sit (top level, struct fields, enum
//! variants, map values, `Vec<Vec<u8>>`): encoding 12–35 GB/s and decoding 6–45 GB/s
//! for 1 MiB on this project's 2-core machine, so a 1 MiB `Vec<u8>`, `String`,
//! `Vec<f64>` or `struct { id: u64, pixels: Vec<u8> }` crosses a `Queue` at 6–15 GB/s
//! and a `Pipe` at 1.6–4 GB/s (CPython's 1 MiB `bytes`: 0.6–1 GB/s either way; figures
//! in `bench/README.md`). `bool` and `char` sequences are validated on the way in
//! (2 and 6.6 GB/s). What costs more is what serde hands over one element at a time:
//! arrays (`Vec<[u8; 4]>` 0.4 GB/s to decode, `Vec<[u8; 16]>` 0.5 GB/s), tuples and
//! structs of numbers (`Vec<(u32, u32)>` 1.6 GB/s), `VecDeque` (0.6 GB/s), and above all
//! many tiny heap values: a `Vec<String>` of 8-byte strings decodes at 0.23 GB/s, one
//! allocation per string. Send such data as one flat buffer (a `Vec<u8>` plus offsets,
//! or a `Vec<f32>` of `3 * n` coordinates) when it is large.
//! [`Connection::recv_borrowed`](crate::Connection::recv_borrowed) reuses the caller's
//! buffer and lets `&[u8]`/`&str` fields borrow from it.
//!
//! Decoding is bounded for input from untrusted peers: no allocation beyond what the
//! bytes that arrived justify, nesting limited to 128 levels (the sender refuses deeper
//! values), invalid `bool`/`char`/UTF-8/tags are errors; a bad message is an
//! [`Error::Serialization`] for that message alone.

pub(crate) mod codec;
pub mod pickle;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{OwnedFd, RawFd};

thread_local! {
    static SINK: RefCell<Option<Vec<RawFd>>> = const { RefCell::new(None) };
    static SOURCE: RefCell<Option<Vec<Option<OwnedFd>>>> = const { RefCell::new(None) };
}

/// An encoded value: the bytes of a native message and the descriptors that go with it.
pub(crate) struct Encoded {
    /// `[u32 LE fd count][encoded value]`.
    pub bytes: Vec<u8>,
    /// Descriptors borrowed from the value; valid while the value is.
    pub fds: Vec<RawFd>,
}

/// Encodes `value` as a native message, setting its descriptors aside.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Encoded> {
    let outer = SINK.with(|s| s.borrow_mut().replace(Vec::new()));
    let res = encode_append(value, vec![0u8; 4]);
    let fds = SINK
        .with(|s| std::mem::replace(&mut *s.borrow_mut(), outer))
        .unwrap_or_default();
    let mut bytes = res?;
    bytes[..4].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    Ok(Encoded { bytes, fds })
}

/// Initialises this thread's descriptor tables (see the forkserver's warm-up).
pub(crate) fn touch_thread_locals() {
    SINK.with(|s| drop(s.borrow()));
    SOURCE.with(|s| drop(s.borrow()));
}

/// Appends the internal encoding of `value` to `buf`.
pub(crate) fn encode_append<T: Serialize + ?Sized>(value: &T, buf: Vec<u8>) -> Result<Vec<u8>> {
    let mut enc = SeqEncoder::new(buf);
    enc.push(value)?;
    Ok(enc.into_inner())
}

/// Appends values one after another to a byte vector (the internal format, see
/// [`codec`]).
pub(crate) struct SeqEncoder {
    buf: Vec<u8>,
}

impl SeqEncoder {
    /// Appends to `buf` (which keeps what it holds).
    pub(crate) fn new(buf: Vec<u8>) -> Self {
        SeqEncoder { buf }
    }

    /// Appends one value.
    #[inline]
    pub(crate) fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        Ok(codec::encode_into(&mut self.buf, value)?)
    }

    /// The bytes so far.
    pub(crate) fn bytes(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// The vector, with everything appended.
    pub(crate) fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

/// A copy of `bytes` (a big one in memory advised for huge pages, as the codec's buffers).
pub(crate) fn copy_of(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    codec::Write::write(&mut v, bytes).expect("writing to a vector cannot fail");
    v
}

/// Reads values one after another from a byte slice, with one decoder for the whole
/// sequence (limits such as the zero-sized element budget apply to the whole).
pub(crate) struct SeqDecoder<'a> {
    de: codec::Deserializer<codec::SliceReader<'a>>,
}

impl<'a> SeqDecoder<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        SeqDecoder {
            de: codec::Deserializer::new(codec::SliceReader::new(bytes)),
        }
    }

    /// The next value (which may borrow from the input).
    #[inline]
    pub(crate) fn next<T: Deserialize<'a>>(&mut self) -> Result<T> {
        Ok(codec::decode_from_reader(&mut self.de)?)
    }

    /// How many bytes have been read.
    pub(crate) fn position(&mut self) -> usize {
        use codec::Read;
        self.de.reader().consumed() as usize
    }
}

/// Decodes one value from the front of `bytes`; returns it and how many bytes it took.
pub(crate) fn decode_from<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, usize)> {
    let mut dec = SeqDecoder::new(bytes);
    let v = dec.next()?;
    Ok((v, dec.position()))
}

/// Decodes a value that must fill `bytes` exactly (leftover bytes mean the sender and the
/// receiver disagree on the type).
pub(crate) fn decode_exact<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    let (v, used) = decode_from(bytes)?;
    if used != bytes.len() {
        return Err(Error::Serialization(format!(
            "type mismatch: the value took {used} of the {} bytes received",
            bytes.len()
        )));
    }
    Ok(v)
}

/// How many descriptors a native message says it carries.
pub(crate) fn fd_count(message: &[u8]) -> Result<usize> {
    let head: [u8; 4] = message
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| {
            Error::protocol(format!(
                "native message of {} bytes is shorter than its header",
                message.len()
            ))
        })?;
    Ok(u32::from_le_bytes(head) as usize)
}

/// Decodes a native message, taking its descriptors from the front of `fds`.
pub(crate) fn decode<'a, T: Deserialize<'a>>(
    message: &'a [u8],
    fds: &mut VecDeque<OwnedFd>,
) -> Result<T> {
    let n = fd_count(message)?;
    if fds.len() < n {
        return Err(Error::protocol(format!(
            "message carries {n} descriptors but {} arrived",
            fds.len()
        )));
    }
    // Most messages carry none: then not even the draining code runs (a new child's first
    // decode would fault its pages in for nothing).
    let mine: Vec<Option<OwnedFd>> = if n == 0 {
        Vec::new()
    } else {
        fds.drain(..n).map(Some).collect()
    };
    let outer = SOURCE.with(|s| s.borrow_mut().replace(mine));
    let res = decode_exact(&message[4..]);
    SOURCE.with(|s| *s.borrow_mut() = outer);
    res
}

/// Serde helpers that carry a file descriptor through this crate's channels
/// (`#[serde(with = "multiprocess::reduction::fd")]`).
///
/// Encoding with any other serializer (JSON, say) fails with a clear error: a descriptor
/// means nothing outside the process that holds it.
pub mod fd {
    use super::{SINK, SOURCE};
    use serde::de::Error as _;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};

    /// Sets the descriptor aside and writes its index.
    pub fn serialize<F: AsFd, S: Serializer>(fd: &F, s: S) -> Result<S::Ok, S::Error> {
        let raw = fd.as_fd().as_raw_fd();
        let index = SINK.with(|sink| {
            sink.borrow_mut().as_mut().map(|v| {
                v.push(raw);
                v.len() - 1
            })
        });
        match index {
            Some(i) => s.serialize_u32(i as u32),
            None => Err(S::Error::custom(
                "a file descriptor can only be sent through multiprocess (a Connection, Queue or Process args)",
            )),
        }
    }

    /// Takes the descriptor that arrived for this index.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OwnedFd, D::Error> {
        let i = u32::deserialize(d)? as usize;
        SOURCE.with(|src| {
            let mut src = src.borrow_mut();
            let table = src.as_mut().ok_or_else(|| {
                D::Error::custom("a file descriptor can only be received through multiprocess")
            })?;
            table.get_mut(i).and_then(Option::take).ok_or_else(|| {
                D::Error::custom(format!("descriptor #{i} is missing or was used twice"))
            })
        })
    }
}

/// A shared mapping travels as its descriptor, and is mapped again on arrival.
impl Serialize for crate::sys::shm::Mapping {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        fd::serialize(&self.fd(), s)
    }
}

impl<'de> serde::Deserialize<'de> for crate::sys::shm::Mapping {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let fd = fd::deserialize(d)?;
        crate::sys::shm::Mapping::map(fd).map_err(serde::de::Error::custom)
    }
}

/// Deserializes a [`Mapping`](crate::sys::shm::Mapping) of an anonymous segment, refusing
/// one that another process could shrink under us (see `sys::shm`).
pub(crate) fn deserialize_sealed<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<crate::sys::shm::Mapping, D::Error> {
    let fd = fd::deserialize(d)?;
    crate::sys::shm::Mapping::map_sealed(fd).map_err(serde::de::Error::custom)
}
