//! A small shared-memory page of atomic counters, used by a pool to see what each worker is
//! doing without a system call on either side. It travels to a child as its descriptor and
//! is mapped again there.

use super::shm::Mapping;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::io;
use std::sync::atomic::AtomicU64;

/// Bytes in a page.
pub(crate) const PAGE: usize = 4096;
/// How many counters a page holds.
pub(crate) const SLOTS: usize = PAGE / 8;

#[derive(Debug)]
pub(crate) struct SharedPage {
    map: Mapping,
}

impl SharedPage {
    /// A new zeroed page.
    pub(crate) fn new() -> io::Result<SharedPage> {
        Ok(SharedPage {
            map: Mapping::anonymous(c"multiprocess-page", PAGE)?,
        })
    }

    /// Another mapping of the same page (for handing one to a child).
    pub(crate) fn try_clone(&self) -> io::Result<SharedPage> {
        Ok(SharedPage {
            map: self.map.try_clone()?,
        })
    }

    /// Counter `i` (< [`SLOTS`]).
    pub(crate) fn slot(&self, i: usize) -> &AtomicU64 {
        assert!(i < SLOTS && self.map.len() >= PAGE);
        // SAFETY: the mapping is at least PAGE bytes and page-aligned, so slot i is in
        // bounds and aligned for AtomicU64; it is only accessed atomically, and lives as
        // long as &self.
        unsafe { &*self.map.as_ptr().cast::<AtomicU64>().add(i) }
    }

    /// Copies `bytes` into the page at byte `offset`. The range must lie in the page and
    /// hold no counter in use: the bytes are plain memory, published to the other side by
    /// a counter stored after them (`Release`) and read after loading it (`Acquire`).
    pub(crate) fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        let end = offset.checked_add(bytes.len()).expect("in range");
        assert!(end <= PAGE && self.map.len() >= PAGE);
        // SAFETY: offset..end lies in the mapping (checked above); `bytes` is ordinary
        // memory of this process, so the two ranges do not overlap. Nobody reads these
        // bytes before the counter that publishes them says they are written.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_ptr().add(offset),
                bytes.len(),
            )
        }
    }

    /// A copy of `len` bytes of the page from byte `offset` (clamped to the page). The
    /// bytes come from another process: the caller checks everything in them.
    pub(crate) fn read_bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        let start = offset.min(PAGE);
        let len = len.min(PAGE - start);
        assert!(self.map.len() >= PAGE);
        let mut out = vec![0u8; len];
        // SAFETY: start..start+len lies in the mapping (clamped above) and `out` is a
        // fresh buffer of `len` bytes; they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), out.as_mut_ptr(), len)
        }
        out
    }
}

impl Serialize for SharedPage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.map.serialize(s)
    }
}

impl SharedPage {
    /// Checks a mapping received from another process: a page made by
    /// [`SharedPage::new`] is sealed against shrinking and exactly one page long.
    fn from_mapping(map: Mapping) -> io::Result<SharedPage> {
        map.check_sealed()?;
        if map.len() != PAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("shared page of {} bytes, expected {PAGE}", map.len()),
            ));
        }
        Ok(SharedPage { map })
    }
}

impl<'de> Deserialize<'de> for SharedPage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        SharedPage::from_mapping(Mapping::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fd::cvt;
    use crate::sys::shm::set_len;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// A memfd of `len` bytes that nobody sealed (what a hostile peer would pass).
    fn unsealed(len: usize) -> OwnedFd {
        // SAFETY: memfd_create with a valid name returns a new fd we own (checked).
        let fd = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::memfd_create(c"test-unsealed".as_ptr(), 0)).unwrap())
        };
        set_len(fd.as_fd(), len).unwrap();
        fd
    }

    #[test]
    fn received_pages_must_be_sealed_and_one_page_long() {
        let page = SharedPage::new().unwrap();
        let copy = SharedPage::from_mapping(page.map.try_clone().unwrap()).unwrap();
        copy.slot(3).store(9, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(page.slot(3).load(std::sync::atomic::Ordering::Relaxed), 9);
        // Unsealed: a peer could shrink it under us (SIGBUS on the next access).
        let e = SharedPage::from_mapping(Mapping::map(unsealed(PAGE)).unwrap()).unwrap_err();
        assert!(e.to_string().contains("sealed"), "{e}");
        // Sealed, but not the size of a page.
        let big = Mapping::anonymous(c"test-big", 2 * PAGE).unwrap();
        let e = SharedPage::from_mapping(big).unwrap_err();
        assert!(e.to_string().contains("expected 4096"), "{e}");
    }
}
