//! Connection edge cases that need no Python peer.

use multiprocess::pipe;

#[test]
fn messages_over_2_gib_use_the_long_form() {
    let len = (1usize << 31) + 16;
    let (a, b) = pipe().unwrap();
    let sender = std::thread::spawn(move || {
        let mut big = vec![0u8; len];
        big[0] = 1;
        big[(1 << 31) - 1] = 2;
        big[len - 1] = 3;
        a.send_bytes(&big).unwrap();
        // A small message right after: the stream is still in sync.
        a.send_bytes(b"after").unwrap();
    });
    let got = b.recv_bytes().unwrap();
    assert_eq!(got.len(), len);
    assert_eq!((got[0], got[(1 << 31) - 1], got[len - 1]), (1, 2, 3));
    drop(got);
    assert_eq!(b.recv_bytes().unwrap(), b"after");
    sender.join().unwrap();
}
