//! Unix sockets: socket pairs and messages that carry file descriptors (`SCM_RIGHTS`).

use super::fd::{cvt, cvt_size};
use std::io::{self, IoSlice};
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

/// The most descriptors one `sendmsg` may carry (the kernel's `SCM_MAX_FD`).
pub(crate) const MAX_FDS_PER_MSG: usize = 253;

/// Which kind of socket pair.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Stream,
    SeqPacket,
}

/// A close-on-exec `AF_UNIX` socket pair.
pub(crate) fn socketpair(kind: Kind) -> io::Result<(OwnedFd, OwnedFd)> {
    let ty = match kind {
        Kind::Stream => libc::SOCK_STREAM,
        Kind::SeqPacket => libc::SOCK_SEQPACKET,
    };
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds points to two writable ints; on success both are fresh descriptors we own.
    unsafe {
        cvt(libc::socketpair(
            libc::AF_UNIX,
            ty | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        ))?;
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// Shuts down one direction (`libc::SHUT_RD` / `SHUT_WR`) of a socket.
pub(crate) fn shutdown(fd: BorrowedFd<'_>, how: libc::c_int) -> io::Result<()> {
    // SAFETY: shutdown on a borrowed descriptor has no memory effects.
    unsafe { cvt(libc::shutdown(fd.as_raw_fd(), how)).map(drop) }
}

fn cmsg_space(nfds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((nfds * mem::size_of::<RawFd>()) as u32) as usize }
}

/// One `sendmsg` of the gathered `bufs`, with `fds` attached (at most
/// [`MAX_FDS_PER_MSG`]). Never raises `SIGPIPE`; retries on `EINTR`. Returns the number
/// of bytes written, which may be less than the total (the fds went with the first byte).
pub(crate) fn sendmsg(
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[RawFd],
    dontwait: bool,
) -> io::Result<usize> {
    assert!(fds.len() <= MAX_FDS_PER_MSG);
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec; // IoSlice is ABI-compatible with iovec
    msg.msg_iovlen = bufs.len() as _;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: the control buffer is large enough for one cmsghdr carrying fds.len()
        // descriptors (CMSG_SPACE above), and properly aligned (u64 storage).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of_val(fds) as u32) as _;
            ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    let flags = libc::MSG_NOSIGNAL | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    loop {
        // SAFETY: msg points to valid iovecs and control data that outlive the call.
        let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// One `recvmsg` into `buf`; descriptors that arrive are appended to `fds` (close-on-exec).
/// Returns the number of bytes read (0 at end of file). Retries on `EINTR`.
pub(crate) fn recvmsg(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    dontwait: bool,
) -> io::Result<usize> {
    let mut control = vec![0u64; cmsg_space(MAX_FDS_PER_MSG).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = (control.len() * 8) as _;
    let flags = libc::MSG_CMSG_CLOEXEC | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    let n = loop {
        // SAFETY: msg points at a live iovec over `buf` and a live control buffer.
        let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    // SAFETY: the kernel filled msg_control with well-formed cmsghdrs up to msg_controllen;
    // the CMSG_* macros walk exactly that range. Each SCM_RIGHTS descriptor is new and ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "file descriptors were dropped in transit (MSG_CTRUNC)",
        ));
    }
    Ok(n)
}
