//! The crate's own wire format: a serde `Serializer` and `Deserializer`, written for it.
//!
//! # Format
//! Little-endian and fixed-width, with no field names and no type tags:
//! integers and floats at their width (`usize`/`isize` as 8 bytes), `bool` one byte (0 or
//! 1), `char` a `u32`, strings and byte strings a `u64` length and the bytes, sequences and
//! maps a `u64` length and the elements (maps key, value, key, value…), `Option` a byte
//! (0 `None`, 1 `Some`) then the value, enum variants a `u32` index then the content,
//! structs and tuples their fields in order. Only this module knows it.
//!
//! # Speed
//! serde hands a `Vec<u8>` over one element at a time. Here a `Vec<P>` or `[P]` of a
//! primitive `P` (`u8` to `u128`, `i8` to `i128`, `f32`, `f64`, `bool`, `char`) is
//! recognised by type (the `typeid` crate gives type ids of non-`'static` types) and moved
//! as one copy on both sides, wherever it sits in a value; strings and byte strings are
//! one copy too. On the decoding side the fast path is taken only when the visitor is
//! serde's own `Vec<P>` visitor (found by asking `Vec<P>` which visitor it uses), so a
//! custom `deserialize_with` keeps its meaning.
//!
//! # Hostile input
//! Decoding never allocates more than the bytes that arrived justify: a length is checked
//! against what is left of the message before anything is allocated (a streaming reader
//! that cannot know the total grows its buffer at most twice as fast as bytes arrive),
//! serde's preallocation hints are capped the same way, elements that take no bytes at all
//! (`Vec<()>`) are counted against a budget, and nesting is limited to [`MAX_DEPTH`]
//! levels (the encoder refuses deeper values too, so what is sent can be received).
//! Invalid `bool`, `char`, UTF-8, `Option` tags and enum indices are errors.

// The unsafe code of this file: viewing a `Vec<P>`'s spare capacity as bytes to fill it,
// and handing a value whose type was proven equal by `TypeId` across a generic boundary.
#![allow(unsafe_code)]

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize};
use std::borrow::Cow;
use std::fmt;
use std::mem::{ManuallyDrop, MaybeUninit};

/// Deepest nesting of sequences, maps, structs, tuples, options and enum contents that
/// is encoded or decoded (recursive types such as `Box<Node>` error instead of
/// overflowing the stack).
pub(crate) const MAX_DEPTH: u32 = 128;

/// How many elements that take no bytes at all (`()`, unit structs) one message may hold.
const ZERO_SIZED_BUDGET: u64 = 1 << 24;

/// An error of this codec (converted to [`crate::Error::Serialization`] at the edges).
#[derive(Debug)]
pub(crate) struct CodecError(Cow<'static, str>);

impl CodecError {
    fn new(msg: &'static str) -> Self {
        CodecError(Cow::Borrowed(msg))
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl ser::Error for CodecError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        CodecError(Cow::Owned(msg.to_string()))
    }
}

impl de::Error for CodecError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        CodecError(Cow::Owned(msg.to_string()))
    }
}

impl From<CodecError> for crate::Error {
    fn from(e: CodecError) -> Self {
        crate::Error::Serialization(e.0.into_owned())
    }
}

type Res<T> = std::result::Result<T, CodecError>;

fn truncated() -> CodecError {
    CodecError::new("the message ended before the value did")
}

fn too_deep() -> CodecError {
    CodecError::new("value nests deeper than the codec's limit of 128 levels")
}

// ---------------------------------------------------------------------------- sinks

/// Where encoded bytes go.
pub(crate) trait Write {
    /// Appends `bytes`.
    fn write(&mut self, bytes: &[u8]) -> Res<()>;
}

impl Write for Vec<u8> {
    #[inline(always)]
    fn write(&mut self, bytes: &[u8]) -> Res<()> {
        if bytes.len() >= BIG {
            reserve_big(self, bytes.len());
        }
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// Buffers at least this big are backed by transparent huge pages where the system allows
/// it (`MADV_HUGEPAGE`): fresh memory costs a page fault per 4 KiB touched, which for a
/// buffer of a few MiB costs as much as copying it.
const BIG: usize = 2 << 20;

/// Makes room in `v` for a write of `n` bytes (`n >= BIG`), and some more for what
/// usually follows (a chunk's or a message's trailer, which would otherwise double the
/// buffer), with the new memory advised to be backed by huge pages. (Advice splits the
/// mapping, so a later growth of `v` copies instead of remapping: fine for the usual
/// one big write per buffer.)
#[cold]
fn reserve_big(v: &mut Vec<u8>, n: usize) {
    if v.capacity() - v.len() < n {
        v.reserve(n.saturating_add(64 << 10));
        crate::sys::socket::advise_huge_pages(v);
    }
}

/// Where encoded bytes come from.
pub(crate) trait Read<'de> {
    /// `true` when [`available`](Self::available) is all that is left of the message (a
    /// complete message in memory); then lengths beyond it are errors before any
    /// allocation. A streaming reader (`false`) may get more later.
    const COMPLETE: bool;

    /// Fills `out`, or fails if the message ends first.
    fn read(&mut self, out: &mut [u8]) -> Res<()>;

    /// Fills `out` (memory not yet initialised); the same as [`read`](Self::read).
    fn read_uninit(&mut self, out: &mut [MaybeUninit<u8>]) -> Res<()>;

    /// Bytes that have arrived and are not read yet.
    fn available(&self) -> usize;

    /// Bytes read so far.
    fn consumed(&self) -> u64;

    /// The next `n` bytes, borrowed from the input for `'de`, when the reader can lend
    /// them (`None`: read them instead).
    #[inline(always)]
    fn borrow(&mut self, _n: usize) -> Option<Res<&'de [u8]>> {
        None
    }

    /// The next `N` bytes.
    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut b = [0u8; N];
        self.read(&mut b)?;
        Ok(b)
    }
}

/// A complete message in memory.
pub(crate) struct SliceReader<'de> {
    bytes: &'de [u8],
    pos: usize,
}

impl<'de> SliceReader<'de> {
    pub(crate) fn new(bytes: &'de [u8]) -> Self {
        SliceReader { bytes, pos: 0 }
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Res<&'de [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let s = self.bytes.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(s)
    }
}

impl<'de> Read<'de> for SliceReader<'de> {
    const COMPLETE: bool = true;

    #[inline(always)]
    fn read(&mut self, out: &mut [u8]) -> Res<()> {
        out.copy_from_slice(self.take(out.len())?);
        Ok(())
    }

    #[inline]
    fn read_uninit(&mut self, out: &mut [MaybeUninit<u8>]) -> Res<()> {
        let src = self.take(out.len())?;
        // SAFETY: `src` and `out` have the same length, are both valid for it, and do not
        // overlap (`out` is writable memory of ours, `src` shared input).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), out.as_mut_ptr().cast::<u8>(), src.len())
        };
        Ok(())
    }

    #[inline(always)]
    fn available(&self) -> usize {
        self.bytes.len() - self.pos
    }

    #[inline(always)]
    fn consumed(&self) -> u64 {
        self.pos as u64
    }

    #[inline(always)]
    fn borrow(&mut self, n: usize) -> Option<Res<&'de [u8]>> {
        Some(self.take(n))
    }

    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let end = self.pos.wrapping_add(N);
        match self.bytes.get(self.pos..end) {
            Some(s) => {
                self.pos = end;
                // The length is N by construction.
                Ok(s.try_into().unwrap_or([0; N]))
            }
            None => Err(truncated()),
        }
    }
}

// ---------------------------------------------------------------------------- bulk

/// Plain numbers: any bit pattern is a value, no padding, copied as little-endian bytes.
trait Pod: bytemuck::Pod {}
macro_rules! pods { ($($t:ty),*) => { $(impl Pod for $t {})* } }
pods!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, f32, f64, usize, isize);

/// Calls `$m!` with the lengths of the byte arrays moved in bulk in sequences
/// (`Vec<[u8; N]>`): 1 to 32, every length serde implements arrays for (a type id is
/// needed per length).
macro_rules! byte_array_sizes {
    ($m:ident) => {
        $m!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30
            31 32);
    };
}
macro_rules! pod_arrays { ($($n:literal)*) => { $(impl Pod for [u8; $n] {})* } }
byte_array_sizes!(pod_arrays);

/// Reads `n` elements of `P` in bulk. A complete input is checked first; a streaming one
/// grows the vector at most to twice what has arrived (or what is already read).
fn read_pod_vec<'de, P: Pod, R: Read<'de>>(r: &mut R, n: usize) -> Res<Vec<P>> {
    let size = std::mem::size_of::<P>();
    let total = n
        .checked_mul(size)
        .ok_or_else(|| CodecError::new("sequence length overflows"))?;
    if R::COMPLETE && total > r.available() {
        return Err(truncated());
    }
    let first = if R::COMPLETE {
        n
    } else {
        n.min((r.available() / size).max(4096 / size))
    };
    let mut v: Vec<P> = Vec::with_capacity(first);
    // Huge pages only for the vector's final memory: advising a range splits its mapping,
    // and a split mapping can no longer grow in place (`mremap`), so each later growth
    // would copy.
    if first == n && n * size >= BIG {
        crate::sys::socket::advise_huge_pages(&mut v);
    }
    while v.len() < n {
        if v.len() == v.capacity() {
            let grow = (n - v.len()).min(v.len().max(r.available() / size).max(1));
            v.reserve_exact(grow);
            if v.capacity() >= n && grow * size >= BIG {
                crate::sys::socket::advise_huge_pages(&mut v);
            }
        }
        let k = (v.capacity() - v.len()).min(n - v.len());
        let spare = &mut v.spare_capacity_mut()[..k];
        // SAFETY: `spare` is `k` elements of uninitialised, writable memory owned by `v`;
        // seen as `k * size` bytes of `MaybeUninit<u8>` (same allocation, alignment 1 is
        // always satisfied, `MaybeUninit` has no validity requirement).
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<MaybeUninit<u8>>(), k * size)
        };
        r.read_uninit(bytes)?;
        // SAFETY: the `k` elements after `len` were fully written by `read_uninit` (it
        // fails otherwise), and every bit pattern is a valid `P` (`P: Pod`).
        unsafe { v.set_len(v.len() + k) };
    }
    Ok(v)
}

/// Bytes, checked and grown as [`read_pod_vec`].
fn read_byte_vec<'de, R: Read<'de>>(r: &mut R, n: usize) -> Res<Vec<u8>> {
    read_pod_vec::<u8, R>(r, n)
}

/// Reinterprets a vector whose element type was validated to be `To`.
///
/// # Safety
/// `From` and `To` have the same size and alignment, and every element of `v` is a valid
/// `To`.
unsafe fn retype_vec<From, To>(v: Vec<From>) -> Vec<To> {
    debug_assert_eq!(std::mem::size_of::<From>(), std::mem::size_of::<To>());
    debug_assert_eq!(std::mem::align_of::<From>(), std::mem::align_of::<To>());
    let mut v = ManuallyDrop::new(v);
    // SAFETY: the caller's contract: same layout, so the allocation (made for `From`
    // with this capacity) has the layout `To` expects, and the elements are valid `To`.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<To>(), v.len(), v.capacity()) }
}

/// Moves `v` into a `U` that is the same type as `T`.
///
/// # Safety
/// `T` and `U` are the same type (their type ids were compared equal).
#[inline(always)]
unsafe fn same_type<T, U>(v: T) -> U {
    let v = ManuallyDrop::new(v);
    // SAFETY: the caller's contract: `T` is `U`, so this is a move of `v`, whose
    // original is never dropped (ManuallyDrop).
    unsafe { std::mem::transmute_copy::<T, U>(&v) }
}

/// The type id of the visitor that `Vec<P>`'s `Deserialize` hands to `deserialize_seq`,
/// found by asking it (folded to a constant by the optimiser in practice).
#[inline(always)]
fn vec_visitor_of<'de, P>() -> Option<std::any::TypeId>
where
    Vec<P>: de::Deserialize<'de>,
{
    let mut id = None;
    let _ = <Vec<P> as de::Deserialize>::deserialize(Probe(&mut id));
    id
}

/// A deserializer that only notes which visitor `deserialize_seq` was given.
struct Probe<'a>(&'a mut Option<std::any::TypeId>);

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = CodecError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Res<V::Value> {
        Err(CodecError::new("probe"))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, _: V) -> Res<V::Value> {
        *self.0 = Some(typeid::of::<V>());
        Err(CodecError::new("probe"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// Whether visitor `V` is serde's own `Vec<P>` visitor (so its value is `Vec<P>` built
/// from the elements in order).
#[inline(always)]
fn is_vec_visitor<'de, V: Visitor<'de>, P>() -> bool
where
    Vec<P>: de::Deserialize<'de>,
{
    typeid::of::<V::Value>() == typeid::of::<Vec<P>>()
        && vec_visitor_of::<P>() == Some(typeid::of::<V>())
}

/// The elements of `iter` as bytes, if it is a `&Vec<P>` or `&[P]` of a primitive `P`.
#[cfg(target_endian = "little")]
#[inline(always)]
fn as_primitive_bytes<I>(iter: &I) -> Option<(usize, &[u8])> {
    macro_rules! try_types {
        ($($t:ty),*) => {$(
            if typeid::of::<I>() == typeid::of::<&Vec<$t>>() {
                // SAFETY: `I` is `&Vec<$t>` (equal type ids), so this reads the reference.
                let v: &Vec<$t> = unsafe { *(iter as *const I).cast::<&Vec<$t>>() };
                return Some((v.len(), bytemuck::cast_slice(v.as_slice())));
            }
            if typeid::of::<I>() == typeid::of::<&[$t]>() {
                // SAFETY: `I` is `&[$t]` (equal type ids), so this reads the reference.
                let v: &[$t] = unsafe { *(iter as *const I).cast::<&[$t]>() };
                return Some((v.len(), bytemuck::cast_slice(v)));
            }
        )*};
    }
    try_types!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, f32, f64, bool, char);
    #[cfg(target_pointer_width = "64")]
    try_types!(usize, isize);
    // Byte arrays (`Vec<[u8; 16]>` ids, `[u8; 4]` pixels): an array is a tuple, its bytes
    // one after the other, so the whole sequence is its flattened bytes.
    macro_rules! try_arrays {
        ($($n:literal)*) => {$(
            if typeid::of::<I>() == typeid::of::<&Vec<[u8; $n]>>() {
                // SAFETY: `I` is `&Vec<[u8; $n]>` (equal type ids), so this reads the reference.
                let v: &Vec<[u8; $n]> = unsafe { *(iter as *const I).cast::<&Vec<[u8; $n]>>() };
                return Some((v.len(), v.as_flattened()));
            }
            if typeid::of::<I>() == typeid::of::<&[[u8; $n]]>() {
                // SAFETY: `I` is `&[[u8; $n]]` (equal type ids), so this reads the reference.
                let v: &[[u8; $n]] = unsafe { *(iter as *const I).cast::<&[[u8; $n]]>() };
                return Some((v.len(), v.as_flattened()));
            }
        )*};
    }
    byte_array_sizes!(try_arrays);
    None
}

// ---------------------------------------------------------------------------- encoder

/// Encodes into a [`Write`] sink.
pub(crate) struct Serializer<'w, W: Write> {
    w: &'w mut W,
    depth: u32,
}

impl<'w, W: Write> Serializer<'w, W> {
    pub(crate) fn new(w: &'w mut W) -> Self {
        Serializer { w, depth: 0 }
    }

    #[inline(always)]
    fn len(&mut self, n: usize) -> Res<()> {
        self.w.write(&(n as u64).to_le_bytes())
    }

    #[inline(always)]
    fn enter(&mut self) -> Res<()> {
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        self.depth += 1;
        Ok(())
    }

    #[inline(always)]
    fn leave(&mut self) {
        self.depth -= 1;
    }
}

/// Encodes `value` into `w`.
#[inline]
pub(crate) fn encode_into<W: Write, T: Serialize + ?Sized>(w: &mut W, value: &T) -> Res<()> {
    value.serialize(&mut Serializer::new(w))
}

macro_rules! ser_num {
    ($($f:ident $t:ty),*) => {$(
        #[inline(always)]
        fn $f(self, v: $t) -> Res<()> {
            self.w.write(&v.to_le_bytes())
        }
    )*};
}

impl<W: Write> ser::Serializer for &mut Serializer<'_, W> {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    ser_num!(serialize_i8 i8, serialize_i16 i16, serialize_i32 i32, serialize_i64 i64,
        serialize_i128 i128, serialize_u8 u8, serialize_u16 u16, serialize_u32 u32,
        serialize_u64 u64, serialize_u128 u128, serialize_f32 f32, serialize_f64 f64);

    #[inline(always)]
    fn serialize_bool(self, v: bool) -> Res<()> {
        self.w.write(&[v as u8])
    }

    #[inline(always)]
    fn serialize_char(self, v: char) -> Res<()> {
        self.w.write(&(v as u32).to_le_bytes())
    }

    #[inline]
    fn serialize_str(self, v: &str) -> Res<()> {
        self.len(v.len())?;
        self.w.write(v.as_bytes())
    }

    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Res<()> {
        self.len(v.len())?;
        self.w.write(v)
    }

    #[inline(always)]
    fn serialize_none(self) -> Res<()> {
        self.w.write(&[0])
    }

    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Res<()> {
        self.w.write(&[1])?;
        self.enter()?;
        value.serialize(&mut *self)?;
        self.leave();
        Ok(())
    }

    #[inline(always)]
    fn serialize_unit(self) -> Res<()> {
        Ok(())
    }

    #[inline(always)]
    fn serialize_unit_struct(self, _: &'static str) -> Res<()> {
        Ok(())
    }

    #[inline]
    fn serialize_unit_variant(self, _: &'static str, index: u32, _: &'static str) -> Res<()> {
        self.w.write(&index.to_le_bytes())
    }

    #[inline]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Res<()> {
        self.enter()?;
        value.serialize(&mut *self)?;
        self.leave();
        Ok(())
    }

    #[inline]
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        value: &T,
    ) -> Res<()> {
        self.w.write(&index.to_le_bytes())?;
        self.enter()?;
        value.serialize(&mut *self)?;
        self.leave();
        Ok(())
    }

    #[inline]
    fn collect_seq<I>(self, iter: I) -> Res<()>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        #[cfg(target_endian = "little")]
        if let Some((n, bytes)) = as_primitive_bytes(&iter) {
            self.enter()?;
            self.len(n)?;
            self.leave();
            return self.w.write(bytes);
        }
        let iter = iter.into_iter();
        let n = match iter.size_hint() {
            (lo, Some(hi)) if lo == hi => lo,
            _ => return Err(CodecError::new("a sequence must know its length")),
        };
        let mut seq = ser::Serializer::serialize_seq(&mut *self, Some(n))?;
        let mut count = 0usize;
        for item in iter {
            ser::SerializeSeq::serialize_element(&mut seq, &item)?;
            count += 1;
        }
        if count != n {
            return Err(CodecError::new(
                "a sequence yielded another number of items than it said",
            ));
        }
        ser::SerializeSeq::end(seq)
    }

    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Res<Self> {
        let n = len.ok_or_else(|| CodecError::new("a sequence must know its length"))?;
        self.enter()?;
        self.len(n)?;
        Ok(self)
    }

    #[inline]
    fn serialize_tuple(self, _: usize) -> Res<Self> {
        self.enter()?;
        Ok(self)
    }

    #[inline]
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Res<Self> {
        self.enter()?;
        Ok(self)
    }

    #[inline]
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Res<Self> {
        self.w.write(&index.to_le_bytes())?;
        self.enter()?;
        Ok(self)
    }

    #[inline]
    fn serialize_map(self, len: Option<usize>) -> Res<Self> {
        let n = len.ok_or_else(|| CodecError::new("a map must know its length"))?;
        self.enter()?;
        self.len(n)?;
        Ok(self)
    }

    #[inline]
    fn serialize_struct(self, _: &'static str, _: usize) -> Res<Self> {
        self.enter()?;
        Ok(self)
    }

    #[inline]
    fn serialize_struct_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Res<Self> {
        self.w.write(&index.to_le_bytes())?;
        self.enter()?;
        Ok(self)
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

macro_rules! compound {
    ($($tr:ident $f:ident),*) => {$(
        impl<W: Write> ser::$tr for &mut Serializer<'_, W> {
            type Ok = ();
            type Error = CodecError;

            #[inline(always)]
            fn $f<T: Serialize + ?Sized>(&mut self, value: &T) -> Res<()> {
                value.serialize(&mut **self)
            }

            #[inline(always)]
            fn end(self) -> Res<()> {
                self.leave();
                Ok(())
            }
        }
    )*};
}
compound!(SerializeSeq serialize_element, SerializeTuple serialize_element,
    SerializeTupleStruct serialize_field, SerializeTupleVariant serialize_field);

impl<W: Write> ser::SerializeStruct for &mut Serializer<'_, W> {
    type Ok = ();
    type Error = CodecError;

    #[inline(always)]
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, value: &T) -> Res<()> {
        value.serialize(&mut **self)
    }

    #[inline(always)]
    fn end(self) -> Res<()> {
        self.leave();
        Ok(())
    }
}

impl<W: Write> ser::SerializeStructVariant for &mut Serializer<'_, W> {
    type Ok = ();
    type Error = CodecError;

    #[inline(always)]
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, value: &T) -> Res<()> {
        value.serialize(&mut **self)
    }

    #[inline(always)]
    fn end(self) -> Res<()> {
        self.leave();
        Ok(())
    }
}

impl<W: Write> ser::SerializeMap for &mut Serializer<'_, W> {
    type Ok = ();
    type Error = CodecError;

    #[inline(always)]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Res<()> {
        key.serialize(&mut **self)
    }

    #[inline(always)]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Res<()> {
        value.serialize(&mut **self)
    }

    #[inline(always)]
    fn end(self) -> Res<()> {
        self.leave();
        Ok(())
    }
}

// ---------------------------------------------------------------------------- decoder

/// Decodes from a [`Read`] source.
pub(crate) struct Deserializer<R> {
    r: R,
    depth: u32,
    zero_sized_left: u64,
}

impl<'de, R: Read<'de>> Deserializer<R> {
    pub(crate) fn new(r: R) -> Self {
        Deserializer {
            r,
            depth: 0,
            zero_sized_left: ZERO_SIZED_BUDGET,
        }
    }

    /// The reader (for its position, or to finish reading past the value).
    pub(crate) fn reader(&mut self) -> &mut R {
        &mut self.r
    }

    #[inline(always)]
    fn u8(&mut self) -> Res<u8> {
        Ok(self.r.array::<1>()?[0])
    }

    #[inline(always)]
    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_le_bytes(self.r.array()?))
    }

    /// A length prefix.
    #[inline(always)]
    fn len(&mut self) -> Res<usize> {
        let n = u64::from_le_bytes(self.r.array()?);
        usize::try_from(n).map_err(|_| CodecError::new("length does not fit in memory"))
    }

    /// A length of `n` bytes to come, checked against what a complete input still holds.
    #[inline(always)]
    fn byte_len(&mut self) -> Res<usize> {
        let n = self.len()?;
        if R::COMPLETE && n > self.r.available() {
            return Err(truncated());
        }
        Ok(n)
    }

    #[inline(always)]
    fn enter(&mut self) -> Res<()> {
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        self.depth += 1;
        Ok(())
    }

    #[inline(always)]
    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// `n` elements of a sequence or map, the depth counted around them.
    #[inline]
    fn elements<V: Visitor<'de>>(&mut self, n: usize, map: bool, visitor: V) -> Res<V::Value> {
        self.enter()?;
        let mut access = Access { de: self, left: n };
        let v = if map {
            visitor.visit_map(&mut access)?
        } else {
            visitor.visit_seq(&mut access)?
        };
        let left = access.left;
        self.leave();
        if left != 0 {
            return Err(CodecError::new("a sequence was read only in part"));
        }
        Ok(v)
    }

    /// Counts an element that took no bytes against the message's budget.
    #[inline(always)]
    fn count_element(&mut self, before: u64) -> Res<()> {
        if self.r.consumed() == before {
            if self.zero_sized_left == 0 {
                return Err(CodecError::new(
                    "too many zero-sized elements in one message",
                ));
            }
            self.zero_sized_left -= 1;
        }
        Ok(())
    }

    /// The fast path for serde's `Vec<P>` visitor, if `V` is one.
    #[inline(always)]
    fn bulk_seq<V: Visitor<'de>>(&mut self, n: usize) -> Option<Res<V::Value>> {
        macro_rules! try_pods {
            ($($t:ty),*) => {$(
                if is_vec_visitor::<V, $t>() {
                    return Some(read_pod_vec::<$t, R>(&mut self.r, n).map(|v| {
                        // SAFETY: `V::Value` is `Vec<$t>` (checked in `is_vec_visitor`).
                        unsafe { same_type::<Vec<$t>, V::Value>(v) }
                    }));
                }
            )*};
        }
        try_pods!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, f32, f64, usize, isize);
        if is_vec_visitor::<V, bool>() {
            return Some(read_pod_vec::<u8, R>(&mut self.r, n).and_then(|v| {
                if v.iter().any(|&b| b > 1) {
                    return Err(CodecError::new("invalid bool"));
                }
                // SAFETY: `u8` and `bool` have the same size and alignment, and every
                // byte is 0 or 1 (checked); `V::Value` is `Vec<bool>` (checked).
                Ok(unsafe { same_type::<Vec<bool>, V::Value>(retype_vec::<u8, bool>(v)) })
            }));
        }
        if is_vec_visitor::<V, char>() {
            return Some(read_pod_vec::<u32, R>(&mut self.r, n).and_then(|v| {
                if v.iter().any(|&c| char::from_u32(c).is_none()) {
                    return Err(CodecError::new("invalid char"));
                }
                // SAFETY: `u32` and `char` have the same size and alignment, and every
                // value is a valid `char` (checked); `V::Value` is `Vec<char>` (checked).
                Ok(unsafe { same_type::<Vec<char>, V::Value>(retype_vec::<u32, char>(v)) })
            }));
        }
        #[cfg(target_pointer_width = "64")]
        {
            try_pods!(usize, isize);
        }
        macro_rules! try_arrays {
            ($($n:literal)*) => { try_pods!($([u8; $n]),*); };
        }
        byte_array_sizes!(try_arrays);
        None
    }
}

/// Decodes one value from the front of `r`.
#[inline]
pub(crate) fn decode_from_reader<'de, R: Read<'de>, T: de::Deserialize<'de>>(
    de: &mut Deserializer<R>,
) -> Res<T> {
    T::deserialize(de)
}

struct Access<'a, R> {
    de: &'a mut Deserializer<R>,
    left: usize,
}

impl<'de, R: Read<'de>> de::SeqAccess<'de> for Access<'_, R> {
    type Error = CodecError;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Res<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let before = self.de.r.consumed();
        let v = seed.deserialize(&mut *self.de)?;
        self.de.count_element(before)?;
        Ok(Some(v))
    }

    #[inline]
    fn size_hint(&self) -> Option<usize> {
        // Never more than the bytes that arrived could hold (a hint preallocates).
        Some(self.left.min(self.de.r.available()))
    }
}

impl<'de, R: Read<'de>> de::MapAccess<'de> for Access<'_, R> {
    type Error = CodecError;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Res<Option<K::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let before = self.de.r.consumed();
        let k = seed.deserialize(&mut *self.de)?;
        self.de.count_element(before)?;
        Ok(Some(k))
    }

    #[inline]
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Res<V::Value> {
        seed.deserialize(&mut *self.de)
    }

    #[inline]
    fn size_hint(&self) -> Option<usize> {
        Some(self.left.min(self.de.r.available()))
    }
}

impl<'de, R: Read<'de>> de::EnumAccess<'de> for &mut Deserializer<R> {
    type Error = CodecError;
    type Variant = Self;

    #[inline]
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Res<(V::Value, Self)> {
        let index = self.u32()?;
        let v = seed.deserialize(index.into_deserializer())?;
        Ok((v, self))
    }
}

impl<'de, R: Read<'de>> de::VariantAccess<'de> for &mut Deserializer<R> {
    type Error = CodecError;

    #[inline]
    fn unit_variant(self) -> Res<()> {
        Ok(())
    }

    #[inline]
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Res<T::Value> {
        self.enter()?;
        let v = seed.deserialize(&mut *self)?;
        self.leave();
        Ok(v)
    }

    #[inline]
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Res<V::Value> {
        de::Deserializer::deserialize_tuple(self, len, visitor)
    }

    #[inline]
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Res<V::Value> {
        de::Deserializer::deserialize_tuple(self, fields.len(), visitor)
    }
}

/// Fields of a struct or tuple: a known number, no prefix.
struct Fields<'a, R> {
    de: &'a mut Deserializer<R>,
    left: usize,
}

impl<'de, R: Read<'de>> de::SeqAccess<'de> for Fields<'_, R> {
    type Error = CodecError;

    #[inline(always)]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Res<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    #[inline(always)]
    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

macro_rules! de_num {
    ($($f:ident $t:ty => $visit:ident),*) => {$(
        #[inline(always)]
        fn $f<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
            visitor.$visit(<$t>::from_le_bytes(self.r.array()?))
        }
    )*};
}

impl<'de, R: Read<'de>> de::Deserializer<'de> for &mut Deserializer<R> {
    type Error = CodecError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Res<V::Value> {
        Err(CodecError::new(
            "the internal format is not self-describing (deserialize_any is not supported)",
        ))
    }

    de_num!(deserialize_i8 i8 => visit_i8, deserialize_i16 i16 => visit_i16,
        deserialize_i32 i32 => visit_i32, deserialize_i64 i64 => visit_i64,
        deserialize_i128 i128 => visit_i128, deserialize_u8 u8 => visit_u8,
        deserialize_u16 u16 => visit_u16, deserialize_u32 u32 => visit_u32,
        deserialize_u64 u64 => visit_u64, deserialize_u128 u128 => visit_u128,
        deserialize_f32 f32 => visit_f32, deserialize_f64 f64 => visit_f64);

    #[inline]
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        match self.u8()? {
            0 => visitor.visit_bool(false),
            1 => visitor.visit_bool(true),
            _ => Err(CodecError::new("invalid bool")),
        }
    }

    #[inline]
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        let c = char::from_u32(self.u32()?).ok_or_else(|| CodecError::new("invalid char"))?;
        visitor.visit_char(c)
    }

    #[inline]
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        let n = self.byte_len()?;
        if let Some(b) = self.r.borrow(n) {
            let s = std::str::from_utf8(b?).map_err(|_| CodecError::new("invalid UTF-8"))?;
            return visitor.visit_borrowed_str(s);
        }
        let s = String::from_utf8(read_byte_vec(&mut self.r, n)?)
            .map_err(|_| CodecError::new("invalid UTF-8"))?;
        visitor.visit_string(s)
    }

    #[inline]
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        let n = self.byte_len()?;
        let s = String::from_utf8(read_byte_vec(&mut self.r, n)?)
            .map_err(|_| CodecError::new("invalid UTF-8"))?;
        visitor.visit_string(s)
    }

    #[inline]
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        let n = self.byte_len()?;
        if let Some(b) = self.r.borrow(n) {
            return visitor.visit_borrowed_bytes(b?);
        }
        visitor.visit_byte_buf(read_byte_vec(&mut self.r, n)?)
    }

    #[inline]
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        let n = self.byte_len()?;
        visitor.visit_byte_buf(read_byte_vec(&mut self.r, n)?)
    }

    #[inline]
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        match self.u8()? {
            0 => visitor.visit_none(),
            1 => {
                self.enter()?;
                let v = visitor.visit_some(&mut *self)?;
                self.leave();
                Ok(v)
            }
            _ => Err(CodecError::new("invalid Option tag")),
        }
    }

    #[inline(always)]
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        visitor.visit_unit()
    }

    #[inline(always)]
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> Res<V::Value> {
        v.visit_unit()
    }

    #[inline]
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Res<V::Value> {
        self.enter()?;
        let v = visitor.visit_newtype_struct(&mut *self)?;
        self.leave();
        Ok(v)
    }

    #[inline]
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        let n = self.len()?;
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        #[cfg(target_endian = "little")]
        if let Some(v) = self.bulk_seq::<V>(n) {
            return v;
        }
        self.elements(n, false, visitor)
    }

    #[inline]
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Res<V::Value> {
        self.enter()?;
        let v = visitor.visit_seq(Fields {
            de: &mut *self,
            left: len,
        })?;
        self.leave();
        Ok(v)
    }

    #[inline]
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> Res<V::Value> {
        self.deserialize_tuple(len, visitor)
    }

    #[inline]
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        let n = self.len()?;
        self.elements(n, true, visitor)
    }

    #[inline]
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Res<V::Value> {
        self.deserialize_tuple(fields.len(), visitor)
    }

    #[inline]
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Res<V::Value> {
        visitor.visit_enum(self)
    }

    #[inline]
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        visitor.visit_u32(self.u32()?)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Res<V::Value> {
        Err(CodecError::new(
            "the internal format is not self-describing (cannot skip a value)",
        ))
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reduction::{decode_exact, encode_append};
    use serde::{Deserialize, Serialize};
    use std::collections::{BTreeMap, HashMap};
    use std::fmt::Debug;

    fn round<T: Serialize + serde::de::DeserializeOwned + PartialEq + Debug>(v: T) -> Vec<u8> {
        let bytes = encode_append(&v, Vec::new()).unwrap();
        let back: T = decode_exact(&bytes).unwrap();
        assert_eq!(back, v);
        // The same through a streaming reader that gets a few bytes at a time.
        let mut de = Deserializer::new(Trickle {
            bytes: &bytes,
            pos: 0,
            step: 7,
        });
        let back: T = decode_from_reader(&mut de).unwrap();
        assert_eq!(back, v);
        assert_eq!(de.r.pos, bytes.len());
        bytes
    }

    /// A streaming reader that lets `step` bytes arrive at a time.
    struct Trickle<'a> {
        bytes: &'a [u8],
        pos: usize,
        step: usize,
    }

    impl<'de> Read<'de> for Trickle<'_> {
        const COMPLETE: bool = false;
        fn read(&mut self, out: &mut [u8]) -> Res<()> {
            let s = self
                .bytes
                .get(self.pos..self.pos + out.len())
                .ok_or_else(truncated)?;
            out.copy_from_slice(s);
            self.pos += out.len();
            Ok(())
        }
        fn read_uninit(&mut self, out: &mut [MaybeUninit<u8>]) -> Res<()> {
            for o in out.iter_mut() {
                let b = *self.bytes.get(self.pos).ok_or_else(truncated)?;
                o.write(b);
                self.pos += 1;
            }
            Ok(())
        }
        fn available(&self) -> usize {
            self.step.min(self.bytes.len() - self.pos)
        }
        fn consumed(&self) -> u64 {
            self.pos as u64
        }
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Frame {
        id: u64,
        pixels: Vec<u8>,
        name: String,
        scale: Option<f64>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    enum Msg {
        Quit,
        Data(Vec<f32>),
        Pair(u8, String),
        Named { ok: bool, chars: Vec<char> },
    }

    #[test]
    fn values_round_trip_with_the_documented_layout() {
        assert_eq!(round(7u32), 7u32.to_le_bytes());
        assert_eq!(round(-2i64), (-2i64).to_le_bytes());
        assert_eq!(round(true), [1]);
        assert_eq!(round('é'), ('é' as u32).to_le_bytes());
        assert_eq!(round(Some(3u8)), [1, 3]);
        assert_eq!(round(None::<u8>), [0]);
        assert_eq!(round(vec![1u8, 2, 3]), [3, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]);
        assert_eq!(
            round(String::from("hi")),
            [2, 0, 0, 0, 0, 0, 0, 0, b'h', b'i']
        );
        assert_eq!(round(Msg::Pair(9, "x".into()))[..5], [2, 0, 0, 0, 9]);
        round(u128::MAX - 5);
        round(i128::MIN + 5);
        round((1u8, -1i16, 2.5f32, "s".to_string(), ()));
        round(Msg::Quit);
        round(Msg::Data(vec![1.5, -0.0, f32::MAX]));
        round(Msg::Named {
            ok: true,
            chars: "añ€😀".chars().collect(),
        });
    }

    #[test]
    fn bulk_paths_round_trip_wherever_they_sit() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        round(bytes.clone());
        round((0..5000i16).collect::<Vec<_>>());
        round((0..5000).map(|i| i as f64 / 3.0).collect::<Vec<_>>());
        round((0..5000u128).collect::<Vec<_>>());
        round((0..5000usize).collect::<Vec<_>>());
        round((0..999).map(|i| i % 3 == 0).collect::<Vec<_>>());
        round("ab€😀".repeat(1000).chars().collect::<Vec<char>>());
        round(vec![vec![1u8, 2], vec![], bytes.clone()]);
        round(vec!["one".to_string(), String::new(), "x".repeat(10_000)]);
        round(Frame {
            id: 3,
            pixels: bytes.clone(),
            name: "f".into(),
            scale: Some(2.0),
        });
        let mut m = HashMap::new();
        m.insert("a".to_string(), vec![1u64, 2, 3]);
        m.insert("b".to_string(), vec![]);
        round(m);
        round(BTreeMap::from([(1u8, vec![0.5f32]), (2, vec![])]));
        round(serde_bytes::ByteBuf::from(bytes.clone()));
        round(bytes.clone().into_boxed_slice());
        round(::bytes::Bytes::from(bytes.clone()));
        round(::bytes::BytesMut::from(&bytes[..1000]));
        round(vec![[1u8, 2, 3, 4]; 100]);
        round(Some(vec![1i8, -1]));
    }

    #[test]
    fn slices_and_vecs_encode_alike() {
        let v = vec![1.0f64, 2.0];
        let a = encode_append(&v, Vec::new()).unwrap();
        let b = encode_append(&v[..], Vec::new()).unwrap();
        let c = encode_append(&std::collections::VecDeque::from(v.clone()), Vec::new()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        // Borrowed on decode from a complete message.
        let s = encode_append("borrowed", Vec::new()).unwrap();
        let back: &str = decode_exact(&s).unwrap();
        assert_eq!(back, "borrowed");
    }

    /// A custom visitor that returns `Vec<u8>` keeps its own meaning (no bulk path).
    #[test]
    fn custom_visitors_are_not_bypassed() {
        #[derive(Deserialize)]
        struct Reversed(#[serde(deserialize_with = "reversed")] Vec<u8>);
        fn reversed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Vec<u8>, A::Error> {
                    let mut v = Vec::new();
                    while let Some(b) = a.next_element::<u8>()? {
                        v.insert(0, b);
                    }
                    Ok(v)
                }
            }
            d.deserialize_seq(V)
        }
        let bytes = encode_append(&vec![1u8, 2, 3], Vec::new()).unwrap();
        let r: Reversed = decode_exact(&bytes).unwrap();
        assert_eq!(r.0, [3, 2, 1]);
    }

    fn err<T: serde::de::DeserializeOwned + Debug>(bytes: &[u8]) -> String {
        match decode_exact::<T>(bytes) {
            Err(crate::Error::Serialization(m)) => m,
            other => panic!("expected a serialization error, got {other:?}"),
        }
    }

    #[test]
    fn hostile_lengths_fail_before_allocating() {
        let huge = (1u64 << 48).to_le_bytes();
        for t in [
            err::<String>(&huge),
            err::<Vec<u8>>(&huge),
            err::<Vec<f64>>(&huge),
            err::<serde_bytes::ByteBuf>(&huge),
            err::<Vec<String>>(&huge),
            err::<HashMap<u64, u64>>(&huge),
            err::<(String, Vec<u8>)>(&[&huge[..], b"abc"].concat()),
        ] {
            assert!(t.contains("ended"), "{t}");
        }
        // u64::MAX elements of 8 bytes overflow.
        assert!(err::<Vec<u64>>(&u64::MAX.to_le_bytes()).contains("overflow"));
        // Nested sequences each claiming a lot: refused, not preallocated level by level.
        let mut nested = Vec::new();
        for _ in 0..100 {
            nested.extend_from_slice(&(1u64 << 40).to_le_bytes());
        }
        err::<Vec<Vec<Vec<Vec<Vec<(u8, u8)>>>>>>(&nested);
    }

    #[test]
    fn zero_sized_elements_are_budgeted() {
        let m = err::<Vec<()>>(&(1u64 << 60).to_le_bytes());
        assert!(m.contains("zero-sized"), "{m}");
        // An honest, modest one is fine.
        round(vec![(); 1000]);
    }

    #[test]
    fn invalid_tags_are_errors() {
        assert!(err::<bool>(&[2]).contains("bool"));
        assert!(err::<Vec<bool>>(&[1, 0, 0, 0, 0, 0, 0, 0, 7]).contains("bool"));
        assert!(err::<char>(&0xD800u32.to_le_bytes()).contains("char"));
        let mut bad_chars = 1u64.to_le_bytes().to_vec();
        bad_chars.extend_from_slice(&0x110000u32.to_le_bytes());
        assert!(err::<Vec<char>>(&bad_chars).contains("char"));
        assert!(err::<String>(&[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe]).contains("UTF-8"));
        assert!(err::<Option<u8>>(&[5, 1]).contains("Option"));
        let m = err::<Msg>(&9u32.to_le_bytes());
        assert!(m.contains("variant"), "{m}");
        // Leftover bytes are a type mismatch.
        assert!(err::<u8>(&[1, 2]).contains("mismatch"));
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Node {
        value: u32,
        next: Option<Box<Node>>,
    }

    #[test]
    fn nesting_is_limited_on_both_sides() {
        let chain = |n: usize| {
            let mut node = None;
            for i in 0..n {
                node = Some(Box::new(Node {
                    value: i as u32,
                    next: node,
                }));
            }
            node.unwrap()
        };
        round(chain(30));
        // Too deep to send.
        let deep = chain(1000);
        let e = encode_append(&deep, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("deeper"), "{e}");
        // Crafted: a million levels of `Some(Node { .. })`, refused without recursion.
        let mut crafted = Vec::new();
        for _ in 0..1_000_000 {
            crafted.extend_from_slice(&[7, 0, 0, 0, 1]);
        }
        assert!(err::<Node>(&crafted).contains("deeper"));
        let mut lists = Vec::new();
        for _ in 0..10_000 {
            lists.extend_from_slice(&1u64.to_le_bytes());
        }
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Tree(Vec<Tree>);
        assert!(err::<Tree>(&lists).contains("deeper"));
        // The limit is exactly MAX_DEPTH levels (a newtype and a sequence are two each).
        fn nest(n: usize) -> Vec<u8> {
            let mut b = Vec::new();
            for _ in 0..n - 1 {
                b.extend_from_slice(&1u64.to_le_bytes());
            }
            b.extend_from_slice(&0u64.to_le_bytes());
            b
        }
        decode_exact::<Tree>(&nest(MAX_DEPTH as usize / 2)).unwrap();
        err::<Tree>(&nest(MAX_DEPTH as usize / 2 + 1));
        decode_exact::<Vec<Vec<Vec<u8>>>>(&nest(3)).unwrap();
    }

    /// A sink that counts its writes: a value moved in bulk takes a few, one element at a
    /// time takes one per element.
    #[derive(Default)]
    struct CountingWriter {
        bytes: Vec<u8>,
        writes: usize,
    }

    impl Write for CountingWriter {
        fn write(&mut self, bytes: &[u8]) -> Res<()> {
            self.writes += 1;
            self.bytes.extend_from_slice(bytes);
            Ok(())
        }
    }

    /// A complete message that counts the reads made of it (as [`CountingWriter`]).
    struct CountingReader<'de> {
        inner: SliceReader<'de>,
        reads: usize,
    }

    impl<'de> Read<'de> for CountingReader<'de> {
        const COMPLETE: bool = true;
        fn read(&mut self, out: &mut [u8]) -> Res<()> {
            self.reads += 1;
            self.inner.read(out)
        }
        fn read_uninit(&mut self, out: &mut [MaybeUninit<u8>]) -> Res<()> {
            self.reads += 1;
            self.inner.read_uninit(out)
        }
        fn available(&self) -> usize {
            self.inner.available()
        }
        fn consumed(&self) -> u64 {
            self.inner.consumed()
        }
    }

    /// Encodes `v` and decodes it as `U`; the bytes, and how many writes and reads each
    /// side took.
    fn bulk<T: Serialize + ?Sized, U: serde::de::DeserializeOwned>(
        v: &T,
    ) -> (U, Vec<u8>, usize, usize) {
        let mut w = CountingWriter::default();
        encode_into(&mut w, v).unwrap();
        let mut de = Deserializer::new(CountingReader {
            inner: SliceReader::new(&w.bytes),
            reads: 0,
        });
        let back: U = decode_from_reader(&mut de).unwrap();
        assert_eq!(de.r.inner.available(), 0);
        let reads = de.r.reads;
        (back, w.bytes, w.writes, reads)
    }

    #[test]
    fn byte_buffers_of_every_common_type_move_in_bulk() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut as_vec = (data.len() as u64).to_le_bytes().to_vec();
        as_vec.extend_from_slice(&data);

        // Box<[u8]> and Arc<[u8]> (serde's `rc`): the format of a Vec<u8>, in bulk.
        let boxed: Box<[u8]> = data.clone().into_boxed_slice();
        let (back, bytes, writes, reads) = bulk::<_, Box<[u8]>>(&boxed);
        assert_eq!(
            (back, &bytes, writes <= 2, reads <= 2),
            (boxed, &as_vec, true, true)
        );
        let shared: std::sync::Arc<[u8]> = data.clone().into();
        let (back, bytes, writes, reads) = bulk::<_, std::sync::Arc<[u8]>>(&shared);
        assert_eq!(
            (back, &bytes, writes <= 2, reads <= 2),
            (shared, &as_vec, true, true)
        );
        // serde_bytes types, and the three read as one another.
        let (back, bytes, writes, reads) =
            bulk::<_, serde_bytes::ByteBuf>(&serde_bytes::Bytes::new(&data));
        assert_eq!(
            (back.into_vec(), &bytes, writes <= 2, reads <= 2),
            (data.clone(), &as_vec, true, true)
        );
        let (back, _, _, _) = bulk::<_, Vec<u8>>(&serde_bytes::ByteBuf::from(data.clone()));
        assert_eq!(back, data);

        // Vec<[u8; N]> and [[u8; N]]: a length, then the arrays' bytes back to back.
        let quads: Vec<[u8; 4]> = data
            .chunks_exact(4)
            .map(|c| c.try_into().unwrap())
            .collect();
        let (back, bytes, writes, reads) = bulk::<_, Vec<[u8; 4]>>(&quads);
        assert_eq!(&bytes[..8], &(quads.len() as u64).to_le_bytes());
        assert_eq!(&bytes[8..], &data[..]);
        assert_eq!((&back, writes <= 2, reads <= 2), (&quads, true, true));
        let ids: Vec<[u8; 16]> = data
            .chunks_exact(16)
            .map(|c| c.try_into().unwrap())
            .collect();
        let (back, _, writes, reads) = bulk::<[[u8; 16]], Vec<[u8; 16]>>(&ids[..]);
        assert_eq!((&back, writes <= 2, reads <= 2), (&ids, true, true));
        // Inside a struct, and through a streaming reader.
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Blocks {
            id: u64,
            rgb: Vec<[u8; 3]>,
            hashes: Vec<[u8; 32]>,
        }
        let b = Blocks {
            id: 9,
            rgb: data
                .chunks_exact(3)
                .map(|c| c.try_into().unwrap())
                .collect(),
            hashes: data
                .chunks_exact(32)
                .map(|c| c.try_into().unwrap())
                .collect(),
        };
        let (back, _, writes, reads) = bulk::<_, Blocks>(&b);
        assert_eq!((&back, writes <= 6, reads <= 6), (&b, true, true));
        round(b);
        // A truncated sequence of arrays is an error, not a short vector.
        let tail: Vec<[u8; 32]> = vec![[1; 32]; 3];
        let mut bytes = encode_append(&tail, Vec::new()).unwrap();
        bytes.truncate(bytes.len() - 1);
        assert!(decode_exact::<Vec<[u8; 32]>>(&bytes).is_err());
    }
}
