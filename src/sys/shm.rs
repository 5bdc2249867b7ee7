//! Shared memory mappings: a file (an anonymous `memfd`, or a named object under
//! `/dev/shm`) mapped `MAP_SHARED`, so that every process that maps it sees the same bytes.
//!
//! A [`Mapping`] travels to a child as its descriptor (serde, through the fd side table) and
//! is mapped again on arrival; its length is read back from the file, never trusted from
//! the message.
//!
//! An anonymous segment is sealed against shrinking (`F_SEAL_SHRINK`, and `F_SEAL_SEAL` so
//! that nobody adds other seals later) as soon as it has its size: a process that holds
//! its descriptor cannot `ftruncate` it under the others' mappings (which would make
//! their next access die of `SIGBUS`). The primitives built on anonymous segments accept
//! only such sealed segments from other processes ([`deserialize_sealed`]).

use super::fd::cvt;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// A `MAP_SHARED` mapping of a whole file, unmapped on drop.
pub(crate) struct Mapping {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory valid until Drop; what is stored in it and how it is
// synchronised is the business of the types built on top (atomics, futex-guarded data).
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself hands out only raw pointers.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A new zero-filled anonymous segment of `len` bytes (`len > 0`).
    pub(crate) fn anonymous(name: &CStr, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a shared mapping must not be empty",
            ));
        }
        // SAFETY: memfd_create with a valid NUL-terminated name returns a new fd we own.
        let fd = unsafe {
            let fd = cvt(libc::memfd_create(
                name.as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            ))?;
            OwnedFd::from_raw_fd(fd)
        };
        set_len(fd.as_fd(), len)?;
        // SAFETY: fcntl on a descriptor we own; no memory is touched.
        unsafe { cvt(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS))? };
        Self::map(fd)
    }

    /// Maps a segment that arrived from another process, which must be an anonymous
    /// segment sealed against shrinking (as [`Mapping::anonymous`] makes them).
    pub(crate) fn map_sealed(fd: OwnedFd) -> io::Result<Mapping> {
        check_sealed(fd.as_fd())?;
        Self::map(fd)
    }

    /// Checks that this mapping's segment is sealed against shrinking (for a mapping
    /// received through [`Mapping`]'s plain `Deserialize`).
    pub(crate) fn check_sealed(&self) -> io::Result<()> {
        check_sealed(self.fd.as_fd())
    }

    /// Maps the whole of the file behind `fd` (its current size, which must be non-zero).
    pub(crate) fn map(fd: OwnedFd) -> io::Result<Mapping> {
        let len = file_len(fd.as_fd())?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared memory segment has size zero",
            ));
        }
        // SAFETY: maps `len` bytes of a file that is `len` long; MAP_SHARED so every process
        // sees the same bytes. The result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { fd, ptr, len })
    }

    /// Another mapping of the same file (a new descriptor and a new address).
    pub(crate) fn try_clone(&self) -> io::Result<Mapping> {
        Self::map(self.fd.try_clone()?)
    }

    /// Start of the mapping (page-aligned).
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The mapped bytes. Other processes may change them at any time; any value is a
    /// valid `u8`, so what is read is always some bytes (see `SharedMemory::as_slice`).
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes that live as long as &self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, writable (see [`Mapping::bytes`]).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; &mut self excludes every other reference made through
        // this mapping in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The descriptor of the file behind the mapping.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; references into it are tied
        // to &self and so cannot outlive it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("fd", &self.fd.as_raw_fd())
            .field("len", &self.len)
            .finish()
    }
}

/// Refuses a segment that another process could shrink under our mapping.
fn check_sealed(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we borrow; no memory is touched.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "shared memory segment is not sealed against shrinking",
        ));
    }
    Ok(())
}

/// The seals of every anonymous segment.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
/// Sets the size of the file behind `fd`.
pub(crate) fn set_len(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size too large"))?;
    // SAFETY: ftruncate on a descriptor we borrow; no memory is touched.
    unsafe { cvt(libc::ftruncate(fd.as_raw_fd(), len))? };
    Ok(())
}

/// The size of the file behind `fd`.
pub(crate) fn file_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the stat buffer on success, checked before it is read.
    let st = unsafe {
        cvt(libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()))?;
        st.assume_init()
    };
    usize::try_from(st.st_size).map_err(|_| io::Error::other("negative file size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_segments_cannot_shrink_and_unsealed_ones_are_refused() {
        let m = Mapping::anonymous(c"test-sealed", 8192).unwrap();
        let e = set_len(m.fd(), 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert_eq!(file_len(m.fd()).unwrap(), 8192);
        // Growing is allowed by the seals but nobody relies on it; adding seals is not.
        // SAFETY: fcntl on a descriptor we borrow; no memory is touched.
        let r = unsafe { libc::fcntl(m.fd().as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(r, -1);
        assert!(Mapping::map_sealed(m.fd().try_clone_to_owned().unwrap()).is_ok());

        // A memfd that a peer could shrink is refused on arrival.
        // SAFETY: memfd_create with a valid name returns a new fd we own (checked).
        let fd = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::memfd_create(c"test-unsealed".as_ptr(), 0)).unwrap())
        };
        set_len(fd.as_fd(), 8192).unwrap();
        let e = Mapping::map_sealed(fd).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
