//! The program image: which build we are (GNU build-id), and code addresses as offsets
//! from an anchor so that they mean the same thing in every process running this build.

use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

/// A function inside this crate whose address anchors every code offset.
#[inline(never)]
fn anchor() {}

fn anchor_addr() -> usize {
    anchor as *const () as usize
}

/// The offset of a code address from the anchor.
pub(crate) fn code_offset(addr: usize) -> i64 {
    addr.wrapping_sub(anchor_addr()) as i64
}

/// The address that `offset` denotes in this process.
pub(crate) fn code_address(offset: i64) -> usize {
    anchor_addr().wrapping_add(offset as usize)
}

/// What the loader tells us about the object that contains this crate.
struct Image {
    /// Its GNU build-id, or a hash of its executable segments.
    id: Vec<u8>,
    /// Its executable segments, as loaded in this process.
    code: Vec<std::ops::Range<usize>>,
}

fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(inspect_image)
}

/// The identity of the loaded object that contains this crate: its GNU build-id when it
/// has one, otherwise a hash of its loaded executable segments. Two processes with equal
/// identities run the same code at the same offsets.
pub(crate) fn build_id() -> &'static [u8] {
    &image().id
}

/// Whether `addr` lies in an executable segment of the object that contains this crate.
pub(crate) fn is_code(addr: usize) -> bool {
    image().code.iter().any(|r| r.contains(&addr))
}

struct Search {
    target: usize,
    found: Option<Vec<u8>>,
    code: Vec<std::ops::Range<usize>>,
}

fn inspect_image() -> Image {
    let mut search = Search {
        target: anchor_addr(),
        found: None,
        code: Vec::new(),
    };
    // SAFETY: dl_iterate_phdr calls `callback` with valid dl_phdr_info pointers while it
    // holds the loader lock; we pass a pointer to a live Search that only the callback
    // touches, and the callback does not unwind.
    unsafe {
        libc::dl_iterate_phdr(Some(callback), (&mut search as *mut Search).cast());
    }
    Image {
        id: search.found.unwrap_or_else(|| b"unknown-image".to_vec()),
        code: search.code,
    }
}

unsafe extern "C" fn callback(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: called by dl_iterate_phdr with a valid info and our Search pointer; the
    // program headers and the segments they describe are mapped for as long as the
    // object is loaded, which covers this call.
    unsafe {
        let search = &mut *(data as *mut Search);
        let info = &*info;
        let base = info.dlpi_addr as usize;
        let phdrs = std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
        let contains = phdrs.iter().any(|p| {
            p.p_type == libc::PT_LOAD && {
                let start = base + p.p_vaddr as usize;
                (start..start + p.p_memsz as usize).contains(&search.target)
            }
        });
        if !contains {
            return 0;
        }
        search.code = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_X != 0)
            .map(|p| {
                let start = base + p.p_vaddr as usize;
                start..start + p.p_memsz as usize
            })
            .collect();
        for p in phdrs.iter().filter(|p| p.p_type == libc::PT_NOTE) {
            let mut note = std::slice::from_raw_parts(
                (base + p.p_vaddr as usize) as *const u8,
                p.p_memsz as usize,
            );
            while note.len() >= 12 {
                let word = |i: usize| {
                    u32::from_ne_bytes([note[i], note[i + 1], note[i + 2], note[i + 3]]) as usize
                };
                let (namesz, descsz, ty) = (word(0), word(4), word(8));
                let name_end = 12 + namesz.next_multiple_of(4);
                let desc_end = name_end + descsz.next_multiple_of(4);
                if desc_end > note.len() {
                    break;
                }
                if ty == 3 /* NT_GNU_BUILD_ID */ && &note[12..12 + namesz] == b"GNU\0" {
                    search.found = Some(note[name_end..name_end + descsz].to_vec());
                    return 1;
                }
                note = &note[desc_end..];
            }
        }
        // No build-id note: hash the executable segments as they are loaded.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_X != 0)
        {
            let seg = std::slice::from_raw_parts(
                (base + p.p_vaddr as usize) as *const u8,
                p.p_filesz as usize,
            );
            seg.hash(&mut h);
        }
        search.found = Some(h.finish().to_le_bytes().to_vec());
        1
    }
}

/// Lower-case hex of a byte string (for messages).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The function pointer that `offset` (from [`code_offset`]) denotes in this process;
/// `None` if that address is not in this image's code (a corrupted or forged offset).
///
/// # Safety
/// `offset` must have been computed by [`code_offset`] on a function of type `T` in a
/// process running the same build (equal [`build_id`]), and `T` must be a function
/// pointer type. (The code-range check catches offsets that are plainly wrong; it cannot
/// tell one function of this image from another.)
pub(crate) unsafe fn fn_at<T: Copy>(offset: i64) -> Option<T> {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<usize>());
    let addr = code_address(offset);
    if !is_code(addr) {
        return None;
    }
    // SAFETY: per the caller's contract, `addr` is the address of a function of type T
    // in this image (same build, same offset from the same anchor), and it lies in the
    // image's code.
    Some(unsafe { std::mem::transmute_copy::<usize, T>(&addr) })
}

/// Makes a value of a zero-sized type.
///
/// # Safety
/// `T` must be zero-sized and inhabited, and making a value of it out of nothing must not
/// break an invariant: here, a fn item or non-capturing closure that the parent process
/// held a value of (the child "receives" that value, the parent forgets its copy).
pub(crate) unsafe fn conjure_zst<T>() -> T {
    assert_eq!(std::mem::size_of::<T>(), 0);
    // SAFETY: a ZST has no bytes to initialise; inhabitedness is the caller's contract.
    unsafe { std::ptr::NonNull::<T>::dangling().as_ptr().read() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_offsets_inside_the_image_resolve_and_others_do_not() {
        let f: fn() -> usize = anchor_addr;
        let off = code_offset(f as usize);
        // SAFETY: `off` was just taken from a function of this type in this process.
        let g = unsafe { fn_at::<fn() -> usize>(off) }.expect("in the image's code");
        assert_eq!(g(), anchor_addr());
        for bogus in [i64::MAX, i64::MIN, 1 << 40, -(1 << 40)] {
            // SAFETY: the check refuses these before anything is called.
            let f = unsafe { fn_at::<fn() -> usize>(bogus) };
            assert!(f.is_none(), "{bogus}");
        }
        // Data is not code.
        static DATA: u64 = 0;
        assert!(!is_code(&DATA as *const u64 as usize));
    }
}
