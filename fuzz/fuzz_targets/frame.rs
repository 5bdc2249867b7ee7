//! Arbitrary bytes from a peer into a Connection: framing, the size limit, the native
//! decoder and the pickle decoder must give typed errors, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiprocess::Connection;
use std::io::Write;
use std::os::unix::net::UnixStream;

fuzz_target!(|data: &[u8]| {
    // The pickle decoder contains serde-pickle's panics (catch_unwind; its set ordering
    // panics on NaN next to big integers); libfuzzer-sys's hook would abort on those
    // contained panics, so use a quiet one. A panic that escapes still fails the run.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let (mut peer, ours) = UnixStream::pair().unwrap();
    // Inputs stay well under the socket buffer, so this write cannot block.
    peer.write_all(&data[..data.len().min(100_000)]).unwrap();
    drop(peer);
    let mut conn = Connection::from(ours);
    conn.set_max_message_size(Some(1 << 20));
    let mut reused = Vec::new();
    for i in 0usize.. {
        let r = match i % 6 {
            0 => conn.recv_bytes().map(drop),
            1 => conn.recv_pickle_value().map(drop),
            2 => conn.recv::<(String, Vec<u32>, Option<f64>)>().map(drop),
            3 => conn.recv::<Vec<(bool, char, Vec<u8>)>>().map(drop),
            4 => conn.recv_borrowed::<(&str, u64)>(&mut reused).map(drop),
            _ => {
                let mut buf = [0u8; 16];
                conn.recv_bytes_into(&mut buf).map(drop)
            }
        };
        if let Err(multiprocess::Error::Eof | multiprocess::Error::Protocol(_) | multiprocess::Error::Io(_)) = r {
            break;
        }
        if i > 10_000 {
            break;
        }
    }
});
