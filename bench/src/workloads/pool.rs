//! Pool rows: `imap` with chunk size 1, a tiny-task `map`, and the `apply_async` round trip,
//! against CPython's fastest Pool (start method `fork`, 3.11's default on Linux; its 3.14
//! default, `forkserver`, on a line of its own) and a bare floor: the same work done by
//! two forked children over socket pairs, with nothing but `read`/`write`/`poll`.

use crate::{python_json, Row};
use multiprocess::Pool;
use std::time::{Duration, Instant};

fn square(x: i64) -> i64 {
    x * x
}

const WORKERS: usize = 2;
const MAP_ITEMS: i64 = 1_000_000;
const IMAP_ITEMS: i64 = 100_000;
const APPLY_CALLS: i64 = 1000;

/// The bare floor: forked children that square the `i64`s they read and write them back,
/// driven over `SOCK_STREAM` socket pairs.
mod bare {
    use std::collections::VecDeque;
    use std::os::fd::RawFd;

    pub struct Child {
        pid: libc::pid_t,
        fd: RawFd,
    }

    /// A child that reads whatever has arrived (up to 64 KiB), squares every whole `i64`
    /// in it, and writes those results back in one `write`; it exits at end of file.
    pub fn fork_squarer() -> Child {
        let mut sv = [0; 2];
        // SAFETY: plain syscalls on descriptors this function owns. The child touches only
        // its stack buffer and async-signal-safe calls (read, write, close, _exit), so
        // forking this multi-threaded process is sound.
        unsafe {
            assert_eq!(
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                    0,
                    sv.as_mut_ptr()
                ),
                0
            );
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let fd = sv[1];
                // Only its own socket: one inherited from a sibling's parent end would keep
                // that sibling from seeing end of file.
                for other in 3..1024 {
                    if other != fd {
                        libc::close(other);
                    }
                }
                let mut buf = [0u8; 65536];
                let mut have = 0usize;
                loop {
                    let n = libc::read(fd, buf[have..].as_mut_ptr().cast(), buf.len() - have);
                    if n <= 0 {
                        libc::_exit(0);
                    }
                    have += n as usize;
                    let whole = have / 8 * 8;
                    for k in (0..whole).step_by(8) {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&buf[k..k + 8]);
                        let x = i64::from_le_bytes(b);
                        buf[k..k + 8].copy_from_slice(&(x.wrapping_mul(x)).to_le_bytes());
                    }
                    let mut off = 0;
                    while off < whole {
                        let w = libc::write(fd, buf[off..whole].as_ptr().cast(), whole - off);
                        if w <= 0 {
                            libc::_exit(1);
                        }
                        off += w as usize;
                    }
                    buf.copy_within(whole..have, 0);
                    have -= whole;
                }
            }
            libc::close(sv[1]);
            Child { pid, fd: sv[0] }
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            // SAFETY: our descriptor and our child.
            unsafe {
                libc::close(self.fd);
                let mut st = 0;
                libc::waitpid(self.pid, &mut st, 0);
            }
        }
    }

    fn write_all(fd: RawFd, mut b: &[u8]) {
        while !b.is_empty() {
            // SAFETY: a valid buffer and our descriptor.
            let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
            assert!(n > 0, "write to a bare child");
            b = &b[n as usize..];
        }
    }

    /// One 8-byte request, one 8-byte reply: the floor under a pool round trip.
    pub fn ping_pong(c: &Child, x: i64) -> i64 {
        write_all(c.fd, &x.to_le_bytes());
        let mut b = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            // SAFETY: a valid buffer and our descriptor.
            let n = unsafe { libc::read(c.fd, b[got..].as_mut_ptr().cast(), 8 - got) };
            assert!(n > 0, "read from a bare child");
            got += n as usize;
        }
        i64::from_le_bytes(b)
    }

    /// Squares `0..items` on `children`: messages of `per_msg` items, each its own
    /// `write`, at most `window` messages in flight per child; results read as they come
    /// and stored in order. The floor under `map` (big messages) and `imap` with chunk
    /// size 1 (one message per item, results coming back batched).
    pub fn squares(children: &[Child], items: usize, per_msg: usize, window: usize) -> Vec<i64> {
        struct Side {
            /// Messages in flight: (first item, items not yet answered).
            inflight: VecDeque<(usize, usize)>,
            /// Messages not yet (wholly) written, and how much of the first was.
            unsent: VecDeque<Vec<u8>>,
            sent: usize,
            buf: Vec<u8>,
            have: usize,
        }
        for c in children {
            // SAFETY: our descriptor.
            unsafe { libc::fcntl(c.fd, libc::F_SETFL, libc::O_NONBLOCK) };
        }
        let mut sides: Vec<Side> = children
            .iter()
            .map(|_| Side {
                inflight: VecDeque::new(),
                unsent: VecDeque::new(),
                sent: 0,
                buf: vec![0u8; 256 * 1024],
                have: 0,
            })
            .collect();
        let mut out = vec![0i64; items];
        let (mut next, mut done) = (0usize, 0usize);
        while done < items {
            for (c, s) in children.iter().zip(sides.iter_mut()) {
                while s.inflight.len() < window && next < items {
                    let n = per_msg.min(items - next);
                    let mut msg = Vec::with_capacity(n * 8);
                    for x in next..next + n {
                        msg.extend_from_slice(&(x as i64).to_le_bytes());
                    }
                    s.unsent.push_back(msg);
                    s.inflight.push_back((next, n));
                    next += n;
                }
                while let Some(m) = s.unsent.front() {
                    // SAFETY: a valid buffer and our descriptor.
                    let w =
                        unsafe { libc::write(c.fd, m[s.sent..].as_ptr().cast(), m.len() - s.sent) };
                    if w < 0 {
                        break; // EAGAIN: the child is behind; poll says when to go on.
                    }
                    s.sent += w as usize;
                    if s.sent == m.len() {
                        s.unsent.pop_front();
                        s.sent = 0;
                    }
                }
            }
            let mut fds: Vec<libc::pollfd> = children
                .iter()
                .zip(&sides)
                .map(|(c, s)| libc::pollfd {
                    fd: c.fd,
                    events: libc::POLLIN
                        | if s.unsent.is_empty() {
                            0
                        } else {
                            libc::POLLOUT
                        },
                    revents: 0,
                })
                .collect();
            // SAFETY: a valid array of pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            for (p, s) in fds.iter().zip(sides.iter_mut()) {
                if p.revents & libc::POLLIN == 0 {
                    continue;
                }
                let have = s.have;
                // SAFETY: a valid buffer and our descriptor.
                let n = unsafe {
                    libc::read(p.fd, s.buf[have..].as_mut_ptr().cast(), s.buf.len() - have)
                };
                if n < 0 {
                    continue;
                }
                assert!(n > 0, "a bare child closed its socket");
                let total = have + n as usize;
                let mut words = s.buf[..total / 8 * 8].chunks_exact(8);
                while words.len() > 0 {
                    let (start, count) = s.inflight.front_mut().expect("a message in flight");
                    let m = (*count).min(words.len());
                    for (slot, w) in out[*start..*start + m].iter_mut().zip(words.by_ref()) {
                        *slot = i64::from_le_bytes(w.try_into().expect("8 bytes"));
                    }
                    *start += m;
                    *count -= m;
                    done += m;
                    if *count == 0 {
                        s.inflight.pop_front();
                    }
                }
                s.buf.copy_within(total / 8 * 8..total, 0);
                s.have = total % 8;
            }
        }
        for c in children {
            // SAFETY: our descriptor.
            unsafe { libc::fcntl(c.fd, libc::F_SETFL, 0) };
        }
        out
    }
}

/// Best of `n` runs of `f`, in seconds.
fn best_of(n: usize, mut f: impl FnMut()) -> f64 {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

pub fn rows(_iters: usize) -> Vec<Row> {
    let pool = Pool::builder().processes(WORKERS).build().unwrap();
    pool.map(square, 0..1000i64).unwrap();

    // imap, chunk size 1 (Python's default), consumed as it comes.
    let imap = best_of(3, || {
        let mut n = 0i64;
        for (i, r) in pool.imap(square, 0..IMAP_ITEMS).unwrap().enumerate() {
            assert_eq!(r.unwrap(), (i as i64) * (i as i64));
            n += 1;
        }
        assert_eq!(n, IMAP_ITEMS);
    });

    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let v = pool.map(square, 0..MAP_ITEMS).unwrap();
        best = best.min(t.elapsed());
        assert_eq!(v.len(), MAP_ITEMS as usize);
    }
    // Warm up as the CPython side does (see pool.py).
    for i in 0..500 {
        pool.apply_async(square, i).unwrap().get().unwrap();
    }
    // Best of three batches (a shared virtual machine has slow spells), as in pool.py.
    let apply = best_of(3, || {
        for i in 0..APPLY_CALLS {
            assert_eq!(pool.apply_async(square, i).unwrap().get().unwrap(), i * i);
        }
    }) * 1e6
        / APPLY_CALLS as f64;
    drop(pool);

    // The floors, measured the same way.
    let children: Vec<bare::Child> = (0..WORKERS).map(|_| bare::fork_squarer()).collect();
    let bare_imap = best_of(3, || {
        let v = bare::squares(&children, IMAP_ITEMS as usize, 1, 16);
        assert_eq!(v[7], 49);
    });
    // Chunks as the pool's default chunk size makes them: four per worker.
    let per_chunk = (MAP_ITEMS as usize).div_ceil(WORKERS * 4);
    let bare_map = best_of(3, || {
        let v = bare::squares(&children, MAP_ITEMS as usize, per_chunk, 2);
        assert_eq!(v.len(), MAP_ITEMS as usize);
    });
    for i in 0..500 {
        bare::ping_pong(&children[0], i);
    }
    let bare_rt = best_of(3, || {
        for i in 0..APPLY_CALLS {
            assert_eq!(bare::ping_pong(&children[0], i), i * i);
        }
    }) * 1e6
        / APPLY_CALLS as f64;
    drop(children);

    let args = |method: &str, imap_items: i64, calls: i64| {
        vec![
            method.to_string(),
            WORKERS.to_string(),
            MAP_ITEMS.to_string(),
            imap_items.to_string(),
            calls.to_string(),
        ]
    };
    let fork = python_json("pool.py", &args("fork", IMAP_ITEMS, APPLY_CALLS));
    // CPython 3.14's default; slow on 3.11, so measured on fewer items.
    let fs = python_json(
        "pool.py",
        &args("forkserver", IMAP_ITEMS / 5, APPLY_CALLS / 5),
    );
    let get = |py: &[serde_json::Value], name: &str, key: &str| {
        py.iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v[key].as_f64())
    };
    let per_item_us = |s: f64| s * 1e6 / IMAP_ITEMS as f64;
    let mut rows = Vec::new();
    let mut add = |name: String, unit, ours, fork: Option<f64>, fs: Option<f64>, floor| {
        rows.push(Row {
            name: format!("{name} vs CPython fork"),
            unit,
            ours,
            python: fork,
            baseline: floor,
        });
        rows.push(Row {
            name: "  same, vs CPython forkserver (3.14 default)".into(),
            unit,
            ours,
            python: fs,
            baseline: None,
        });
    };
    add(
        format!("imap chunksize 1, 100k, {WORKERS} workers, per item"),
        "us",
        per_item_us(imap),
        get(&fork, "imap", "us_per_item"),
        get(&fs, "imap", "us_per_item"),
        Some(("bare per-item writes", per_item_us(bare_imap))),
    );
    add(
        format!("pool.map(x*x) over 1M, {WORKERS} workers"),
        "ms",
        best.as_secs_f64() * 1e3,
        get(&fork, "map", "seconds").map(|s| s * 1e3),
        get(&fs, "map", "seconds").map(|s| s * 1e3),
        Some(("bare 8 chunks", bare_map * 1e3)),
    );
    add(
        "apply_async(..).get() round trip".into(),
        "us",
        apply,
        get(&fork, "apply_async", "mean_us"),
        get(&fs, "apply_async", "mean_us"),
        Some(("socketpair ping-pong", bare_rt)),
    );
    rows
}
