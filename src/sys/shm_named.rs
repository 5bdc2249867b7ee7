//! Named POSIX shared memory: what `shm_open`/`shm_unlink` do on Linux, as plain file
//! operations on the tmpfs at `/dev/shm` (the same objects CPython's
//! `multiprocessing.shared_memory` opens).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

const DIR: &str = "/dev/shm";

fn path(name: &str) -> PathBuf {
    PathBuf::from(DIR).join(name)
}

/// Creates a new segment of `size` bytes (fails with `AlreadyExists` if the name is
/// taken), readable and writable by the owner only. Close-on-exec.
pub(crate) fn create(name: &str, size: u64) -> io::Result<OwnedFd> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path(name))?;
    if let Err(e) = f.set_len(size) {
        let _ = std::fs::remove_file(path(name));
        return Err(e);
    }
    Ok(f.into())
}

/// Opens an existing segment read-write. Close-on-exec.
pub(crate) fn open(name: &str) -> io::Result<OwnedFd> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path(name))?;
    Ok(f.into())
}

/// Removes the name (mappings and descriptors already open stay valid).
pub(crate) fn unlink(name: &str) -> io::Result<()> {
    std::fs::remove_file(path(name))
}

/// `(device, inode)` of an open segment.
pub(crate) fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let f = File::from(fd.try_clone_to_owned()?);
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// `(device, inode)` of the segment that has `name` now, if any.
pub(crate) fn identity_of(name: &str) -> io::Result<(u64, u64)> {
    let m = std::fs::symlink_metadata(path(name))?;
    Ok((m.dev(), m.ino()))
}
