//! Shared memory segments passed by a hostile peer: a segment that could be shrunk under
//! us, or whose header does not describe what the receiver expects, is refused with a
//! typed error for that message, and the connection goes on.
#![allow(unsafe_code)] // makes the memfds a hostile peer would pass (libc), as an attacker would

use multiprocess::sharedctypes::Value;
use multiprocess::{pipe, Error};
use serde::Serialize;
use std::os::fd::{FromRawFd, OwnedFd};

/// A bare descriptor, in the place where a shared value's segment travels.
#[derive(Serialize)]
struct Segment(#[serde(with = "multiprocess::reduction::fd")] OwnedFd);

/// A memfd of `len` bytes holding `fill`, sealed against shrinking or not.
fn memfd(len: usize, fill: u8, sealed: bool) -> OwnedFd {
    use std::io::Write;
    let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create with a valid name returns a new descriptor (checked), which
    // nothing else owns.
    let fd = unsafe {
        let fd = libc::memfd_create(c"hostile".as_ptr(), flags);
        assert!(fd >= 0);
        OwnedFd::from_raw_fd(fd)
    };
    let mut f = std::fs::File::from(fd);
    f.write_all(&vec![fill; len]).unwrap();
    let fd = OwnedFd::from(f);
    if sealed {
        // SAFETY: fcntl on a descriptor we own; no memory is touched.
        let r = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK,
            )
        };
        assert_eq!(r, 0);
    }
    fd
}

#[test]
fn unsealed_or_foreign_segments_are_refused_and_the_connection_goes_on() {
    let (a, b) = pipe().unwrap();
    let refused = |what: &str, needle: &str| match b.recv::<Value<u64>>() {
        Err(Error::Serialization(msg)) => {
            eprintln!("{what}: {msg}");
            assert!(msg.contains(needle), "{what}: {msg}");
        }
        other => panic!(
            "{what}: expected Error::Serialization, got {:?}",
            other.map(|v| v.get())
        ),
    };
    // The right size for a shared u64, but a peer could ftruncate it to zero at any time.
    a.send(&Segment(memfd(4096, 0, false))).unwrap();
    refused("unsealed memfd", "sealed");
    // Sealed, but its header is garbage: not a shared value at all.
    a.send(&Segment(memfd(4096, 0xff, true))).unwrap();
    refused("foreign header", "different kind");
    // Sealed, but too small to hold even the header.
    a.send(&Segment(memfd(16, 0, true))).unwrap();
    refused("tiny segment", "too small");
    // A real shared value still arrives and is shared.
    let v = Value::new(7u64).unwrap();
    a.send(&v).unwrap();
    let got = b.recv::<Value<u64>>().unwrap();
    assert_eq!(got.get(), 7);
}
