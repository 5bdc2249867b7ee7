//! CPython's message framing, as pure functions (no I/O): a 4-byte big-endian signed
//! length, or `-1` followed by an 8-byte big-endian length for messages over 2 GiB − 1.
//! See `specs/python-connection-protocol.md` §1.

/// The largest payload the short (4-byte) header can describe.
pub const SHORT_MAX: u64 = 0x7FFF_FFFF;

/// A frame header ready to write: 4 or 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; 12],
    len: usize,
}

impl Header {
    /// The header for a payload of `len` bytes: the short form up to [`SHORT_MAX`], the
    /// long form above, exactly as CPython writes it.
    ///
    /// ```
    /// use multiprocess::connection::framing::Header;
    /// assert_eq!(Header::for_len(5).as_bytes(), &[0, 0, 0, 5]);
    /// assert_eq!(Header::for_len(1 << 31).as_bytes(), &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0x80, 0, 0, 0]);
    /// ```
    pub fn for_len(len: u64) -> Header {
        let mut bytes = [0u8; 12];
        if len <= SHORT_MAX {
            bytes[..4].copy_from_slice(&(len as u32).to_be_bytes());
            Header { bytes, len: 4 }
        } else {
            bytes[..4].copy_from_slice(&[0xff; 4]);
            bytes[4..].copy_from_slice(&len.to_be_bytes());
            Header { bytes, len: 12 }
        }
    }

    /// The bytes to write.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// What the first bytes of a frame say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Need at least this many header bytes in total before anything can be said.
    NeedMore(usize),
    /// A complete header of `header_len` bytes announcing a payload of `len` bytes.
    Frame {
        /// 4 or 12.
        header_len: usize,
        /// Payload length.
        len: u64,
    },
    /// A negative length other than `-1`. CPython silently returns `b''` for these; we
    /// treat them as a protocol error.
    Invalid(i32),
}

/// Parses the start of a frame.
///
/// ```
/// use multiprocess::connection::framing::{parse_header, Parsed};
/// assert_eq!(parse_header(&[0, 0]), Parsed::NeedMore(4));
/// assert_eq!(parse_header(&[0, 0, 0, 5, b'h']), Parsed::Frame { header_len: 4, len: 5 });
/// assert_eq!(parse_header(&[0xff, 0xff, 0xff, 0xff]), Parsed::NeedMore(12));
/// assert_eq!(parse_header(&[0xff, 0xff, 0xff, 0xfe]), Parsed::Invalid(-2));
/// ```
pub fn parse_header(buf: &[u8]) -> Parsed {
    if buf.len() < 4 {
        return Parsed::NeedMore(4);
    }
    let short = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    match short {
        n if n >= 0 => Parsed::Frame {
            header_len: 4,
            len: n as u64,
        },
        -1 => {
            if buf.len() < 12 {
                return Parsed::NeedMore(12);
            }
            let mut long = [0u8; 8];
            long.copy_from_slice(&buf[4..12]);
            Parsed::Frame {
                header_len: 12,
                len: u64::from_be_bytes(long),
            }
        }
        n => Parsed::Invalid(n),
    }
}
