//! A small shared-memory page of atomic counters (memfd + `mmap(MAP_SHARED)`), used by a
//! pool to see what each worker is doing without a system call on either side. It travels
//! to a child as its descriptor and is mapped again there.

use super::fd::cvt;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

const PAGE: usize = 4096;
/// How many counters a page holds.
pub(crate) const SLOTS: usize = PAGE / 8;

pub(crate) struct SharedPage {
    fd: OwnedFd,
    ptr: NonNull<AtomicU64>,
}

// SAFETY: the mapping is only accessed through atomics, which are Sync; the pointer stays
// valid until Drop unmaps it.
unsafe impl Send for SharedPage {}
// SAFETY: as above.
unsafe impl Sync for SharedPage {}

impl SharedPage {
    /// A new zeroed page.
    pub(crate) fn new() -> io::Result<SharedPage> {
        // SAFETY: memfd_create with a valid NUL-terminated name returns a new fd we own.
        let fd = unsafe {
            let fd = cvt(libc::memfd_create(
                c"multiprocess-page".as_ptr(),
                libc::MFD_CLOEXEC,
            ))?;
            OwnedFd::from_raw_fd(fd)
        };
        // SAFETY: ftruncate on our own descriptor.
        unsafe { cvt(libc::ftruncate(fd.as_raw_fd(), PAGE as libc::off_t))? };
        Self::map(fd)
    }

    /// Another mapping of the same page (for handing one to a child).
    pub(crate) fn try_clone(&self) -> io::Result<SharedPage> {
        Self::map(self.fd.try_clone()?)
    }

    fn map(fd: OwnedFd) -> io::Result<SharedPage> {
        // SAFETY: maps PAGE bytes of a memfd that is at least PAGE long (we sized it, or the
        // sender did); MAP_SHARED so every process sees the same bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedPage { fd, ptr })
    }

    /// Counter `i` (< [`SLOTS`]).
    pub(crate) fn slot(&self, i: usize) -> &AtomicU64 {
        assert!(i < SLOTS);
        // SAFETY: the mapping is PAGE bytes, page-aligned, so slot i is in bounds and
        // aligned for AtomicU64; it lives as long as &self.
        unsafe { &*self.ptr.as_ptr().add(i) }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference outlives &self.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), PAGE);
        }
    }
}

impl Serialize for SharedPage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        crate::reduction::fd::serialize(&self.fd.as_fd(), s)
    }
}

impl<'de> Deserialize<'de> for SharedPage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fd = crate::reduction::fd::deserialize(d)?;
        SharedPage::map(fd).map_err(serde::de::Error::custom)
    }
}
