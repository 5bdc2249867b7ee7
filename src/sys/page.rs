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

impl<'de> Deserialize<'de> for SharedPage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Mapping::deserialize(d)?;
        if map.len() < PAGE {
            return Err(serde::de::Error::custom("shared page is too small"));
        }
        Ok(SharedPage { map })
    }
}
