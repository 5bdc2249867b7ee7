//! Queue throughput with one producer process and one consumer process: a million `i64`
//! items against CPython's `Queue` and `SimpleQueue`; 1 MiB items against CPython's
//! `Queue` and a bare shared-memory stream between two processes (the floor).
//!
//! Times run from the first item received to the last, so process start is excluded on
//! every side.

use crate::{python_json, Row};
use multiprocess::{Process, Queue};
use serde_bytes::ByteBuf;
use std::hint::black_box;
use std::time::Instant;

const SMALL_N: u64 = 1_000_000;
const MIB: usize = 1 << 20;
const BIG_N: u64 = 512;

fn produce_i64((q, n): (Queue<i64>, u64)) {
    for i in 0..n {
        q.put(i as i64).unwrap();
    }
}

fn produce_big((q, n): (Queue<ByteBuf>, u64)) {
    let item = ByteBuf::from(vec![1u8; MIB]);
    for _ in 0..n {
        q.put_ref(&item).unwrap();
    }
}

/// `get` for the item types measured here (the bench does not depend on serde itself).
trait Get {
    fn get_one(&self);
}

impl Get for Queue<i64> {
    fn get_one(&self) {
        black_box(self.get().unwrap());
    }
}

impl Get for Queue<ByteBuf> {
    fn get_one(&self) {
        black_box(self.get().unwrap());
    }
}

/// Nanoseconds per item seen by the consumer (this process).
fn consume<T>(q: &Queue<T>, n: u64, producer: Process) -> f64
where
    Queue<T>: Get,
{
    producer.start().unwrap();
    q.get_one();
    let t = Instant::now();
    for _ in 1..n {
        q.get_one();
    }
    let dt = t.elapsed();
    producer.join().unwrap();
    dt.as_secs_f64() * 1e9 / (n - 1) as f64
}

fn best_of(trials: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..trials).map(|_| f()).fold(f64::INFINITY, f64::min)
}

/// The floor: a producer process memcpys items into a 4 MiB shared ring, the consumer
/// memcpys them out into one reused buffer; head and tail are plain atomics, waits spin
/// and yield. No framing, no locks, no allocation, no encoding.
mod bare {
    use std::sync::atomic::{AtomicU64, Ordering::*};

    const RING: usize = 4 << 20;

    fn wait() {
        std::thread::yield_now();
    }

    /// Nanoseconds per item of `size` bytes, `n` items.
    pub fn stream(n: u64, size: usize) -> f64 {
        let len = 4096 + RING;
        let src = vec![1u8; size];
        let mut dst = vec![0u8; size];
        // SAFETY: a fresh shared anonymous mapping, checked; the header atomics live in
        // its first page (zeroed), the ring after it. The child only copies bytes,
        // touches the atomics and `_exit`s (no allocation, no locks), which is sound
        // after fork even if this process has other threads. The parent unmaps after
        // reaping the child.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let base = p.cast::<u8>();
            let head = &*base.cast::<AtomicU64>();
            let tail = &*base.add(64).cast::<AtomicU64>();
            let data = base.add(4096);
            let pid = libc::fork();
            if pid == 0 {
                let mut t = 0u64;
                for _ in 0..n {
                    let mut off = 0;
                    while off < size {
                        let free = RING - (t - head.load(Acquire)) as usize;
                        if free == 0 {
                            wait();
                            continue;
                        }
                        let o = t as usize % RING;
                        let k = free.min(size - off).min(RING - o);
                        std::ptr::copy_nonoverlapping(src.as_ptr().add(off), data.add(o), k);
                        off += k;
                        t += k as u64;
                        tail.store(t, Release);
                    }
                }
                libc::_exit(0);
            }
            let mut h = 0u64;
            let mut take = |dst: &mut [u8]| {
                let mut off = 0;
                while off < size {
                    let avail = (tail.load(Acquire) - h) as usize;
                    if avail == 0 {
                        wait();
                        continue;
                    }
                    let o = h as usize % RING;
                    let k = avail.min(size - off).min(RING - o);
                    std::ptr::copy_nonoverlapping(data.add(o), dst.as_mut_ptr().add(off), k);
                    off += k;
                    h += k as u64;
                    head.store(h, Release);
                }
            };
            take(&mut dst);
            let t0 = std::time::Instant::now();
            for _ in 1..n {
                take(&mut dst);
                std::hint::black_box(&dst);
            }
            let dt = t0.elapsed();
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            libc::munmap(p, len);
            dt.as_secs_f64() * 1e9 / (n - 1) as f64
        }
    }
}

pub fn rows(_iters: usize) -> Vec<Row> {
    let py = python_json("queues.py", &[SMALL_N.to_string(), BIG_N.to_string()]);
    let py_ns = |case: &str, kind: &str| {
        py.iter()
            .find(|v| v["case"] == case && v["kind"] == kind)
            .and_then(|v| v["ns_per_item"].as_f64())
    };
    // Best of several trials; ours and the floor alternate so that both see the same
    // machine (other load on it only ever slows a trial down).
    let small = best_of(5, || {
        let q = Queue::new().unwrap();
        let p = Process::new(produce_i64, (q.clone(), SMALL_N));
        consume(&q, SMALL_N, p)
    });
    let (mut big, mut floor) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..7 {
        let q = Queue::new().unwrap();
        let p = Process::new(produce_big, (q.clone(), BIG_N));
        big = big.min(consume(&q, BIG_N, p));
        floor = floor.min(bare::stream(BIG_N, MIB));
    }
    vec![
        Row {
            name: "queue i64 1P+1C vs Queue".into(),
            unit: "ns",
            ours: small,
            python: py_ns("i64", "Queue"),
            baseline: None,
        },
        Row {
            name: "queue i64 1P+1C vs SimpleQueue".into(),
            unit: "ns",
            ours: small,
            python: py_ns("i64", "SimpleQueue"),
            baseline: None,
        },
        Row {
            name: "queue 1 MiB items 1P+1C".into(),
            unit: "us",
            ours: big / 1e3,
            python: py_ns("1MiB", "Queue").map(|ns| ns / 1e3),
            baseline: Some(("bare shm ring", floor / 1e3)),
        },
    ]
}
