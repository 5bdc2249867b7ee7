//! A small shared-memory page of atomic counters, used by a pool to see what each worker is
//! doing without a system call on either side. It travels to a child as its descriptor and
//! is mapped again there.

use super::shm::Mapping;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::io;
use std::sync::atomic::AtomicU64;

const PAGE: usize = 4096;
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
