//! The child's side of the connection benchmarks, shared by the side-by-side harness
//! (`workloads/connection.rs`) and the criterion benches (`benches/connection.rs`).

use multiprocess::Connection;

/// Echoes small messages, acknowledges bulk ones; with `into`, receives with
/// `recv_bytes_into` into one reused buffer instead of a fresh vector per message.
pub fn serve((conn, into): (Connection, bool)) {
    if into {
        let mut buf = vec![0u8; 64 << 20];
        while let Ok(n) = conn.recv_bytes_into(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = if n <= 64 {
                conn.send_bytes(&buf[..n])
            } else {
                conn.send_bytes(b"k")
            };
        }
        return;
    }
    while let Ok(m) = conn.recv_bytes() {
        if m.is_empty() {
            break;
        }
        let _ = if m.len() <= 64 {
            conn.send_bytes(&m)
        } else {
            conn.send_bytes(b"k")
        };
    }
}
