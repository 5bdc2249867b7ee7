//! Bulk data as users write it: 1 MiB items of `Vec<u8>`, `String`, `Vec<f64>`, a struct
//! holding a `Vec<u8>`, `serde_bytes::ByteBuf`, `bytes::Bytes`, `Box<[u8]>`, `Arc<[u8]>`
//! and `Vec<[u8; 16]>`, through a `Queue` and through a `Pipe`
//! (`Connection::send`/`recv`), one producer process and the parent consuming; against
//! CPython sending 1 MiB `bytes` the same two ways.
//!
//! Times run from the first item received to the last, so process start is excluded on
//! every side. Rows give microseconds per item and, in the name, GB/s.

use crate::{python_json, Row};
use multiprocess::{Connection, Process, Queue};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::hint::black_box;
use std::time::Instant;

const MIB: usize = 1 << 20;
const N: u64 = 200;
const TRIALS: usize = 5;

/// A struct holding a buffer, as users write them.
#[derive(Serialize, Deserialize)]
pub struct Frame {
    id: u64,
    pixels: Vec<u8>,
}

/// An item type measured here: how to make a 1 MiB one.
trait Item: Serialize + DeserializeOwned + Send + 'static {
    const NAME: &'static str;
    fn make() -> Self;
}

impl Item for Vec<u8> {
    const NAME: &'static str = "Vec<u8>";
    fn make() -> Self {
        vec![1u8; MIB]
    }
}

impl Item for String {
    const NAME: &'static str = "String";
    fn make() -> Self {
        "a".repeat(MIB)
    }
}

impl Item for Vec<f64> {
    const NAME: &'static str = "Vec<f64>";
    fn make() -> Self {
        vec![1.5; MIB / 8]
    }
}

impl Item for Frame {
    const NAME: &'static str = "struct {u64, Vec<u8>}";
    fn make() -> Self {
        Frame {
            id: 7,
            pixels: vec![1u8; MIB],
        }
    }
}

impl Item for ByteBuf {
    const NAME: &'static str = "ByteBuf";
    fn make() -> Self {
        ByteBuf::from(vec![1u8; MIB])
    }
}

impl Item for bytes::Bytes {
    const NAME: &'static str = "bytes::Bytes";
    fn make() -> Self {
        bytes::Bytes::from(vec![1u8; MIB])
    }
}

impl Item for Box<[u8]> {
    const NAME: &'static str = "Box<[u8]>";
    fn make() -> Self {
        vec![1u8; MIB].into_boxed_slice()
    }
}

impl Item for std::sync::Arc<[u8]> {
    const NAME: &'static str = "Arc<[u8]>";
    fn make() -> Self {
        vec![1u8; MIB].into()
    }
}

impl Item for Vec<[u8; 16]> {
    const NAME: &'static str = "Vec<[u8; 16]>";
    fn make() -> Self {
        vec![[1u8; 16]; MIB / 16]
    }
}

fn produce_queue<T: Item>((q, n): (Queue<T>, u64)) {
    let item = T::make();
    for _ in 0..n {
        q.put_ref(&item).unwrap();
    }
}

fn produce_pipe<T: Item>((c, n): (Connection, u64)) {
    let item = T::make();
    for _ in 0..n {
        c.send(&item).unwrap();
    }
}

/// Nanoseconds per item seen by the consumer (this process), `get` called `n` times.
fn consume(n: u64, producer: Process, mut get: impl FnMut()) -> f64 {
    producer.start().unwrap();
    get();
    let t = Instant::now();
    for _ in 1..n {
        get();
    }
    let dt = t.elapsed();
    producer.join().unwrap();
    dt.as_secs_f64() * 1e9 / (n - 1) as f64
}

fn queue_ns<T: Item>() -> f64 {
    let q: Queue<T> = Queue::new().unwrap();
    let p = Process::new(produce_queue::<T>, (q.clone(), N));
    consume(N, p, || {
        black_box(q.get().unwrap());
    })
}

fn pipe_ns<T: Item>() -> f64 {
    let (a, b) = multiprocess::pipe().unwrap();
    let p = Process::new(produce_pipe::<T>, (b, N));
    consume(N, p, || {
        black_box(a.recv::<T>().unwrap());
    })
}

/// The receive buffer reused from message to message (`Connection::recv_borrowed`); the
/// value is decoded from it (`borrowed`: viewed in it, no copy).
fn pipe_reused_ns(borrowed: bool) -> f64 {
    let (a, b) = multiprocess::pipe().unwrap();
    let p = Process::new(produce_pipe::<Vec<u8>>, (b, N));
    let mut buf = Vec::new();
    consume(N, p, || {
        if borrowed {
            black_box(a.recv_borrowed::<&[u8]>(&mut buf).unwrap());
        } else {
            black_box(a.recv_borrowed::<Vec<u8>>(&mut buf).unwrap());
        }
    })
}

fn produce_big((c, size, n): (Connection, usize, u64)) {
    let msg = vec![1u8; size];
    for _ in 0..n {
        c.send_bytes(&msg).unwrap();
    }
}

/// Large messages as raw bytes (`send_bytes`/`recv_bytes`, a fresh buffer each time):
/// the receive buffer grows as the bytes arrive, and this row shows what that costs.
fn pipe_big_ns(size: usize, n: u64) -> f64 {
    let (a, b) = multiprocess::pipe().unwrap();
    let p = Process::new(produce_big, (b, size, n));
    consume(n, p, || {
        black_box(a.recv_bytes().unwrap());
    })
}

/// `Queue::get_borrowed`: each item copied once out of the ring into a reused buffer
/// and viewed there as `&[u8]`.
fn queue_borrowed_ns() -> f64 {
    let q: Queue<Vec<u8>> = Queue::new().unwrap();
    let p = Process::new(produce_queue::<Vec<u8>>, (q.clone(), N));
    let mut buf = Vec::new();
    consume(N, p, || {
        black_box(q.get_borrowed::<&[u8]>(&mut buf).unwrap());
    })
}

fn best_of(trials: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..trials).map(|_| f()).fold(f64::INFINITY, f64::min)
}

fn row(how: &str, name: &str, ns: f64, python_ns: Option<f64>) -> Row {
    Row {
        name: format!("{how} {name} ({:.2} GB/s)", MIB as f64 / ns),
        unit: "us",
        ours: ns / 1e3,
        python: python_ns.map(|p| p / 1e3),
        baseline: None,
    }
}

fn rows_for<T: Item>(py_queue: Option<f64>, py_pipe: Option<f64>) -> Vec<Row> {
    let q = best_of(TRIALS, queue_ns::<T>);
    let p = best_of(TRIALS, pipe_ns::<T>);
    vec![
        row("queue", T::NAME, q, py_queue),
        row("pipe", T::NAME, p, py_pipe),
    ]
}

/// Only the large-message rows (`--only bulk-big`).
pub fn big_rows(_iters: usize) -> Vec<Row> {
    big(Vec::new())
}

fn big(mut rows: Vec<Row>) -> Vec<Row> {
    for (mib, n) in [(16, 40), (64, 12)] {
        let ns = best_of(TRIALS, || pipe_big_ns(mib * MIB, n));
        rows.push(Row {
            name: format!(
                "pipe recv_bytes {mib} MiB ({:.2} GB/s)",
                (mib * MIB) as f64 / ns
            ),
            unit: "us",
            ours: ns / 1e3,
            python: None,
            baseline: None,
        });
    }
    rows
}

pub fn rows(_iters: usize) -> Vec<Row> {
    let py = python_json("bulk.py", &[N.to_string()]);
    let py_ns = |kind: &str| {
        py.iter()
            .find(|v| v["kind"] == kind)
            .and_then(|v| v["ns_per_item"].as_f64())
    };
    let (pq, pp) = (py_ns("Queue"), py_ns("Pipe"));
    let mut rows = Vec::new();
    rows.extend(rows_for::<Vec<u8>>(pq, pp));
    rows.extend(rows_for::<String>(pq, pp));
    rows.extend(rows_for::<Vec<f64>>(pq, pp));
    rows.extend(rows_for::<Frame>(pq, pp));
    rows.extend(rows_for::<ByteBuf>(pq, pp));
    rows.extend(rows_for::<bytes::Bytes>(pq, pp));
    rows.extend(rows_for::<Box<[u8]>>(pq, pp));
    rows.extend(rows_for::<std::sync::Arc<[u8]>>(pq, pp));
    rows.extend(rows_for::<Vec<[u8; 16]>>(pq, pp));
    let view = best_of(TRIALS, queue_borrowed_ns);
    rows.push(row("queue get_borrowed", "&[u8] view", view, pq));
    let reused = best_of(TRIALS, || pipe_reused_ns(false));
    rows.push(row("pipe recv_borrowed", "Vec<u8>", reused, pp));
    let view = best_of(TRIALS, || pipe_reused_ns(true));
    rows.push(row("pipe recv_borrowed", "&[u8] view", view, pp));
    // The large-message rows are their own workload (`bulk-big`), run after this one.
    rows
}
