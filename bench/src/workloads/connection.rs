//! `Connection` between two processes: our `pipe()` against CPython's `Pipe`
//! (`py/connection.py`) and a bare `socketpair` with raw `read`/`write` (libc, forked
//! child). Ping-pong of 16-byte messages in µs per round trip; bulk messages of 1 MiB and
//! 64 MiB (acknowledged with one byte) in ms per message, with `recv_bytes` and with
//! `recv_bytes_into` a reused buffer.

use crate::{python_json, Row};

use multiprocess::pipe;
use std::time::Instant;

const SMALL: usize = 16;
const ROUNDS: usize = 5_000;
/// Each figure is the best of this many trials (the machine may be shared).
const TRIALS: usize = 5;

fn bulk_count(size: usize) -> usize {
    ((256usize << 20) / size).clamp(4, 256)
}

fn ours(into: bool) -> (f64, Vec<(usize, f64)>) {
    let (c, theirs) = pipe().unwrap();
    let child = multiprocess::spawn(crate::echo::serve, (theirs, into)).unwrap();
    let msg = [7u8; SMALL];
    for _ in 0..1000 {
        c.send_bytes(&msg).unwrap();
        c.recv_bytes().unwrap();
    }
    let pp = best_time(|| {
        for _ in 0..ROUNDS {
            c.send_bytes(&msg).unwrap();
            c.recv_bytes().unwrap();
        }
    }) * 1e6
        / ROUNDS as f64;
    let mut bw = Vec::new();
    for size in [1usize << 20, 64 << 20] {
        let data = vec![0x5au8; size];
        let n = bulk_count(size);
        let t = best_time(|| {
            for _ in 0..n {
                c.send_bytes(&data).unwrap();
                c.recv_bytes().unwrap();
            }
        });
        bw.push((size, (size * n) as f64 / t / 1e6));
    }
    c.send_bytes(b"").unwrap();
    child.join().unwrap();
    (pp, bw)
}

/// The shortest of [`TRIALS`] runs of `f`, in seconds.
fn best_time(mut f: impl FnMut()) -> f64 {
    (0..TRIALS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn write_all(fd: i32, mut b: &[u8]) {
    while !b.is_empty() {
        // SAFETY: b is a valid readable buffer of b.len() bytes.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        assert!(n > 0, "write failed");
        b = &b[n as usize..];
    }
}

fn read_exact(fd: i32, b: &mut [u8]) -> bool {
    let mut got = 0;
    while got < b.len() {
        // SAFETY: the tail of b is a valid writable buffer.
        let n = unsafe { libc::read(fd, b[got..].as_mut_ptr().cast(), b.len() - got) };
        if n <= 0 {
            return false;
        }
        got += n as usize;
    }
    true
}

/// A bare socketpair with a forked child that echoes `SMALL + 4` byte messages, or
/// swallows a bulk message of the announced size and acknowledges it with one byte.
fn bare() -> (f64, Vec<(usize, f64)>) {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid out-array of two ints.
    assert_eq!(
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
        0
    );
    // SAFETY: the child only makes raw syscalls on its own buffers, then _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let fd = fds[1];
        let mut head = [0u8; 4];
        let mut buf = vec![0u8; 64 << 20];
        loop {
            if !read_exact(fd, &mut head) {
                break;
            }
            let len = u32::from_be_bytes(head) as usize;
            if len == 0 {
                break;
            }
            if !read_exact(fd, &mut buf[..len]) {
                break;
            }
            if len <= 64 {
                let mut out = head.to_vec();
                out.extend_from_slice(&buf[..len]);
                write_all(fd, &out);
            } else {
                write_all(fd, &[0, 0, 0, 1, b'k']);
            }
        }
        // SAFETY: leave at once without running the parent's atexit handlers.
        unsafe { libc::_exit(0) };
    }
    let fd = fds[0];
    let mut msg = vec![0u8, 0, 0, SMALL as u8];
    msg.extend_from_slice(&[7u8; SMALL]);
    let mut reply = vec![0u8; SMALL + 4];
    for _ in 0..1000 {
        write_all(fd, &msg);
        read_exact(fd, &mut reply);
    }
    let pp = best_time(|| {
        for _ in 0..ROUNDS {
            write_all(fd, &msg);
            read_exact(fd, &mut reply);
        }
    }) * 1e6
        / ROUNDS as f64;
    let mut bw = Vec::new();
    for size in [1usize << 20, 64 << 20] {
        let mut data = (size as u32).to_be_bytes().to_vec();
        data.resize(4 + size, 0x5a);
        let n = bulk_count(size);
        let mut ack = [0u8; 5];
        let t = best_time(|| {
            for _ in 0..n {
                write_all(fd, &data);
                read_exact(fd, &mut ack);
            }
        });
        bw.push((size, (size * n) as f64 / t / 1e6));
    }
    write_all(fd, &[0, 0, 0, 0]);
    let mut st = 0;
    // SAFETY: waits for our own child.
    unsafe {
        libc::waitpid(pid, &mut st, 0);
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    (pp, bw)
}

/// Milliseconds per bulk message of `size` bytes at `mbps` (10^6 bytes per second).
fn ms_per_message(size: usize, mbps: f64) -> f64 {
    size as f64 / mbps / 1e3
}

pub fn rows(_iters: usize) -> Vec<Row> {
    let (pp, bw) = ours(false);
    let (_, bw_into) = ours(true);
    let (bare_pp, bare_bw) = bare();
    let py = python_json("connection.py", &[]);
    let py_get = |key: &str| py.first().and_then(|v| v[key].as_f64());
    let mut rows = vec![Row {
        name: "Connection ping-pong 16 B".into(),
        unit: "us",
        ours: pp,
        python: py_get("pingpong_us"),
        baseline: Some(("socketpair", bare_pp)),
    }];
    for (label, bw) in [("recv_bytes", &bw), ("recv_bytes_into", &bw_into)] {
        for (&(size, v), &(_, bare)) in bw.iter().zip(&bare_bw) {
            let py_mbps = py_get(&format!("bw_{}MiB_MBps", size >> 20));
            rows.push(Row {
                name: format!("Connection {} MiB {label}", size >> 20),
                unit: "ms",
                ours: ms_per_message(size, v),
                python: py_mbps.map(|p| ms_per_message(size, p)),
                baseline: Some(("socketpair", ms_per_message(size, bare))),
            });
        }
    }
    rows
}
