//! Typed views of a shared [`Mapping`]: a small self-describing prefix, a header made only
//! of atomics, and a payload of plain-data elements.
//!
//! ```text
//! [ Meta: magic, element size, element align, element count ][ H ][ pad to 64 ][ payload ]
//! ```
//!
//! The prefix lets a process that receives a mapping check that it is what it expects (a
//! `Value<u8>` received as a `Value<u64>` is a clean error, not a misread). What it says
//! is checked once, when the region is attached, and the element count and size are kept
//! in the process: another process that rewrites the prefix later cannot make an access
//! reach past the mapping.
#![allow(unsafe_code)]

use super::shm::Mapping;
use bytemuck::Pod;
use std::ffi::CStr;
use std::io;
use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Header types made only of atomics (or arrays and structs of them).
///
/// # Safety
/// The type must be `#[repr(C)]`, valid when all bytes are zero, have alignment at most 8,
/// and be mutated only through atomic operations (so that sharing it between processes
/// through `&H` is sound).
pub(crate) unsafe trait Atomics: Sync + 'static {}

// SAFETY: a zero-sized header has no bytes to misinterpret.
unsafe impl Atomics for () {}
// SAFETY: an atomic is valid for any bytes, aligned to its size, and only mutated
// atomically.
unsafe impl Atomics for AtomicU32 {}
// SAFETY: as for AtomicU32.
unsafe impl Atomics for AtomicU64 {}

/// Declares a `#[repr(C)]` struct whose fields are all [`Atomics`] (checked at compile
/// time), and marks it [`Atomics`] itself: the way headers are declared outside `sys`.
macro_rules! atomics_struct {
    (
        $(#[$m:meta])*
        $vis:vis struct $name:ident {
            $($(#[$fm:meta])* $fvis:vis $field:ident : $ty:ty),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[repr(C)]
        $vis struct $name {
            $($(#[$fm])* $fvis $field: $ty),*
        }

        // SAFETY: repr(C) and every field is `Atomics` (checked below): the struct is then
        // valid when zeroed, aligned to at most 8, and only mutated atomically. (Allowed
        // where the macro is used: the argument is this macro's, made in `sys`.)
        #[allow(unsafe_code)]
        unsafe impl $crate::sys::region::Atomics for $name {}

        const _: () = {
            fn field_is_atomics<T: $crate::sys::region::Atomics>() {}
            #[allow(dead_code)]
            fn check() {
                $(field_is_atomics::<$ty>();)*
            }
        };
    };
}
pub(crate) use atomics_struct;

/// The kinds of region, as written in the prefix: one table, so that no two kinds share a
/// number and every module that names another kind's number finds it here, below both.
pub(crate) mod magic {
    pub(crate) const LOCK: u32 = 0x4c4f_434b; // "LOCK"
    pub(crate) const RLOCK: u32 = 0x524c_434b; // "RLCK"
    pub(crate) const COND: u32 = 0x434f_4e44; // "COND"
    pub(crate) const SEM: u32 = 0x5345_4d41; // "SEMA"
    pub(crate) const BSEM: u32 = 0x4253_454d; // "BSEM"
    pub(crate) const EVENT: u32 = 0x4556_4e54; // "EVNT"
    pub(crate) const BARRIER: u32 = 0x4241_5252; // "BARR"
    pub(crate) const VALUE: u32 = 0x5641_4c55; // "VALU"
    pub(crate) const ARRAY: u32 = 0x4152_5259; // "ARRY"
    pub(crate) const RAW_VALUE: u32 = 0x5256_414c; // "RVAL"
    pub(crate) const RAW_ARRAY: u32 = 0x5241_5252; // "RARR"
}

#[repr(C)]
struct Meta {
    magic: AtomicU32,
    elem_size: AtomicU32,
    elem_align: AtomicU32,
    _reserved: AtomicU32,
    len: AtomicU64,
}

const PAYLOAD_ALIGN: usize = 64;

/// A mapping laid out as `[Meta][H][payload]`.
pub(crate) struct Region<H> {
    map: Mapping,
    /// Element count and size, from the prefix as checked at creation or attach.
    len: usize,
    elem_size: usize,
    _h: PhantomData<H>,
}

impl<H: Atomics> Region<H> {
    const OFFSET: usize = {
        assert!(align_of::<H>() <= 8);
        (size_of::<Meta>() + size_of::<H>()).div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN
    };

    /// A new zeroed region for `len` elements of `elem_size` bytes aligned to `elem_align`.
    pub(crate) fn new(
        name: &CStr,
        magic: u32,
        elem_size: usize,
        elem_align: usize,
        len: usize,
    ) -> io::Result<Region<H>> {
        if elem_align > PAYLOAD_ALIGN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("element alignment {elem_align} is over the supported {PAYLOAD_ALIGN}"),
            ));
        }
        let total = elem_size
            .checked_mul(len)
            .and_then(|b| b.checked_add(Self::OFFSET))
            .filter(|&t| t <= isize::MAX as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "size too large"))?;
        let map = Mapping::anonymous(name, total)?;
        let r = Region {
            map,
            len,
            elem_size,
            _h: PhantomData,
        };
        let m = r.meta();
        m.elem_size.store(elem_size as u32, Ordering::Relaxed);
        m.elem_align.store(elem_align as u32, Ordering::Relaxed);
        m.len.store(len as u64, Ordering::Relaxed);
        m.magic.store(magic, Ordering::Release);
        Ok(r)
    }

    /// Checks that a received mapping is a region of one of the kinds `magics` and, if
    /// `elem` is given, of that element `(size, align)`.
    pub(crate) fn from_mapping(
        map: Mapping,
        magics: &[u32],
        elem: Option<(usize, usize)>,
    ) -> Result<Region<H>, String> {
        if map.len() < Self::OFFSET {
            return Err(format!(
                "shared segment of {} bytes is too small for its header",
                map.len()
            ));
        }
        let mut r = Region {
            map,
            len: 0,
            elem_size: 0,
            _h: PhantomData,
        };
        let m = r.meta();
        if !magics.contains(&m.magic.load(Ordering::Acquire)) {
            return Err("shared segment holds a different kind of object".into());
        }
        let (size, align) = (
            m.elem_size.load(Ordering::Relaxed) as usize,
            m.elem_align.load(Ordering::Relaxed) as usize,
        );
        if let Some((elem_size, elem_align)) = elem {
            if size != elem_size || align != elem_align {
                return Err(format!(
                    "shared segment holds elements of {size} bytes (align {align}), expected {elem_size} (align {elem_align})"
                ));
            }
        }
        let len = m.len.load(Ordering::Relaxed);
        let need = (len as u128) * size as u128 + Self::OFFSET as u128;
        // Regions are made exactly as long as their header says: any other size is a
        // segment this crate did not make (or whose header was rewritten).
        if need != r.map.len() as u128 {
            return Err(format!(
                "shared segment of {} bytes does not match its header ({} bytes of content)",
                r.map.len(),
                need
            ));
        }
        // Within the mapping, so within usize.
        r.len = len as usize;
        r.elem_size = size;
        Ok(r)
    }

    fn meta(&self) -> &Meta {
        // SAFETY: the mapping is page-aligned and at least OFFSET bytes, which covers Meta;
        // Meta is made of atomics, valid for any bytes, and only accessed atomically.
        unsafe { &*self.map.as_ptr().cast::<Meta>() }
    }

    /// The header.
    #[inline]
    pub(crate) fn header(&self) -> &H {
        // SAFETY: H sits right after Meta (whose size, 24, is a multiple of H's alignment
        // of at most 8) inside the first OFFSET bytes of the mapping; `Atomics` promises
        // that any bytes are a valid H and that it is only mutated atomically.
        unsafe { &*self.map.as_ptr().add(size_of::<Meta>()).cast::<H>() }
    }

    /// Number of payload elements (as checked at attach; never re-read).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Start of the payload (aligned to 64 bytes).
    #[inline]
    pub(crate) fn payload(&self) -> *mut u8 {
        // SAFETY: OFFSET is within the mapping (checked at creation and on receipt).
        unsafe { self.map.as_ptr().add(Self::OFFSET) }
    }

    /// The payload as `&mut [T]`.
    ///
    /// # Safety
    /// `T` must be the element type the region was made for, and the caller must hold
    /// whatever excludes every other access to the payload (its lock) for the lifetime of
    /// the slice.
    #[allow(clippy::mut_from_ref)]
    #[inline]
    pub(crate) unsafe fn slice_mut<T: Pod>(&self) -> &mut [T] {
        // SAFETY: the payload holds len elements of T (size and alignment checked against
        // the prefix), is 64-byte aligned, any bytes are a valid T (Pod), and the caller
        // guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.payload().cast::<T>(), self.len()) }
    }

    /// Reads element `i` with a volatile copy (for lock-free "raw" shared values, where
    /// other processes may write at any time; a concurrent write can tear the value).
    pub(crate) fn read_volatile<T: Pod>(&self, i: usize) -> T {
        assert!(i < self.len(), "index out of range");
        // SAFETY: in bounds and aligned (see slice_mut); any bytes are a valid T (Pod);
        // a volatile read of shared memory does not assume the bytes are unchanging.
        unsafe { std::ptr::read_volatile(self.payload().cast::<T>().add(i)) }
    }

    /// Writes element `i` with a volatile copy (see [`Region::read_volatile`]).
    pub(crate) fn write_volatile<T: Pod>(&self, i: usize, v: T) {
        assert!(i < self.len(), "index out of range");
        // SAFETY: in bounds and aligned; the payload is plain shared memory that this
        // process may write; no Rust reference to it is live across this call.
        unsafe { std::ptr::write_volatile(self.payload().cast::<T>().add(i), v) }
    }

    /// The payload as atomics (for regions made with 4-byte elements).
    pub(crate) fn atomics(&self) -> &[AtomicU32] {
        assert_eq!(self.elem_size, 4);
        // SAFETY: len 4-byte elements, 64-byte aligned, within the mapping; atomics are
        // valid for any bytes and only accessed atomically.
        unsafe { std::slice::from_raw_parts(self.payload().cast::<AtomicU32>(), self.len()) }
    }

    /// The mapping (to send it to another process).
    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_is_kept_from_attach_not_reread() {
        let r = Region::<AtomicU32>::new(c"test-region", magic::RAW_ARRAY, 4, 4, 8).unwrap();
        let other = Region::<AtomicU32>::from_mapping(
            r.mapping().try_clone().unwrap(),
            &[magic::RAW_ARRAY],
            Some((4, 4)),
        )
        .unwrap();
        // Another process rewrites the prefix to claim far more elements.
        r.meta().len.store(u64::MAX / 8, Ordering::Relaxed);
        assert_eq!(other.len(), 8);
        assert_eq!(other.atomics().len(), 8);
        assert_eq!(other.read_volatile::<u32>(7), 0);
        // A later attach checks the prefix again, and refuses it.
        assert!(Region::<AtomicU32>::from_mapping(
            r.mapping().try_clone().unwrap(),
            &[magic::RAW_ARRAY],
            Some((4, 4)),
        )
        .is_err());
        // A header that claims fewer elements than the segment holds is refused too.
        r.meta().len.store(4, Ordering::Relaxed);
        let e = Region::<AtomicU32>::from_mapping(
            r.mapping().try_clone().unwrap(),
            &[magic::RAW_ARRAY],
            Some((4, 4)),
        )
        .err()
        .unwrap();
        assert!(e.contains("does not match"), "{e}");
    }
}
