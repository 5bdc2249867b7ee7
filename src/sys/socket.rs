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
    // u64 storage keeps the control buffer aligned for cmsghdr. A few descriptors fit
    // on the stack: no allocation for the common sends (none or one descriptor).
    let words = cmsg_space(fds.len()).div_ceil(8);
    let mut small = [0u64; 8];
    let mut large = Vec::new();
    let control: &mut [u64] = if words <= small.len() {
        &mut small[..words]
    } else {
        large.resize(words, 0);
        &mut large
    };
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

/// Words of control buffer for a `recvmsg` that may carry [`MAX_FDS_PER_MSG`]
/// descriptors (`CMSG_SPACE(253 * 4)` = 1032 bytes on Linux), kept on the stack.
const CONTROL_WORDS: usize = 160;

/// One `recvmsg` into `buf`; descriptors that arrive are appended to `fds` (close-on-exec).
/// Returns the number of bytes read (0 at end of file). Retries on `EINTR`.
pub(crate) fn recvmsg(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    dontwait: bool,
) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes for the whole call.
    unsafe {
        recvmsg_raw(
            fd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut |f| fds.push(f),
            dontwait,
        )
    }
}

/// [`recvmsg`] handing each arriving descriptor to `on_fd` (no allocation).
pub(crate) fn recvmsg_with(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    on_fd: &mut dyn FnMut(OwnedFd),
    dontwait: bool,
) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes for the whole call.
    unsafe { recvmsg_raw(fd, buf.as_mut_ptr(), buf.len(), on_fd, dontwait) }
}

/// One `recvmsg` of at most `max` bytes into the spare capacity of `buf` (no
/// zero-filling first); the bytes read are appended to `buf`. Returns their number.
pub(crate) fn recvmsg_append(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max: usize,
    fds: &mut Vec<OwnedFd>,
    dontwait: bool,
) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    // SAFETY: the spare capacity is valid for writes of `len` bytes; the kernel writes
    // plain bytes, which need no initialisation beforehand.
    let n = unsafe {
        recvmsg_raw(
            fd,
            spare.as_mut_ptr().cast(),
            len,
            &mut |f| fds.push(f),
            dontwait,
        )?
    };
    // SAFETY: the kernel initialised exactly the first n (<= len <= spare) bytes of the
    // spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// # Safety
/// `base` must be valid for writes of `len` bytes for the duration of the call.
unsafe fn recvmsg_raw(
    fd: BorrowedFd<'_>,
    base: *mut u8,
    len: usize,
    on_fd: &mut dyn FnMut(OwnedFd),
    dontwait: bool,
) -> io::Result<usize> {
    debug_assert!(cmsg_space(MAX_FDS_PER_MSG) <= CONTROL_WORDS * 8);
    // Not zeroed (a `memset` of 1280 bytes per read, and in a new child a page of libc
    // to fault in): the kernel writes the control messages it delivers and says how
    // many bytes in `msg_controllen`, and only those are read back.
    let mut control = mem::MaybeUninit::<[u64; CONTROL_WORDS]>::uninit();
    let mut iov = libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of::<[u64; CONTROL_WORDS]>() as _;
    let flags = libc::MSG_CMSG_CLOEXEC | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    let n = loop {
        // SAFETY: msg points at a live iovec over `base`/`len` (valid for writes, per this
        // function's contract) and a live control buffer.
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
                    on_fd(OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i))));
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

/// Asks for send and receive buffers of `bytes` each (the kernel caps the request at
/// `net.core.wmem_max`/`rmem_max` and doubles it). Larger buffers mean fewer context
/// switches for big messages.
pub(crate) fn set_buffer_sizes(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let v: libc::c_int = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: passes a pointer to a live c_int and its exact size.
        unsafe {
            cvt(libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            ))?;
        }
    }
    Ok(())
}

/// Asks the kernel to back the spare capacity of `buf` with transparent huge pages
/// (`MADV_HUGEPAGE`), so that receiving a large message into fresh memory takes a few
/// dozen page faults instead of thousands. Purely advisory; errors are ignored.
pub(crate) fn advise_huge_pages<T>(buf: &mut Vec<T>) {
    const HUGE: usize = 2 << 20;
    let spare = buf.spare_capacity_mut();
    let start = spare.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(spare);
    let aligned_start = start.next_multiple_of(HUGE);
    let aligned_end = end / HUGE * HUGE;
    if aligned_end > aligned_start {
        // SAFETY: the range lies inside memory this Vec owns (its spare capacity);
        // MADV_HUGEPAGE only changes how the kernel backs it, never its contents.
        unsafe {
            libc::madvise(
                aligned_start as *mut libc::c_void,
                aligned_end - aligned_start,
                libc::MADV_HUGEPAGE,
            );
        }
    }
}
