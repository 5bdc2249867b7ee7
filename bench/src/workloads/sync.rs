//! Uncontended lock and semaphore round trips against CPython's `multiprocessing.Lock` /
//! `Semaphore` and an in-process `std::sync::Mutex`; two processes incrementing a shared
//! `Value<i64>` under its lock against CPython's `Value('q')` with `get_lock()`.

use crate::{python_json, Row};
use multiprocess::{Lock, Process, Semaphore, Value};
use std::hint::black_box;
use std::time::Instant;

/// Best of three, nanoseconds per call of `f`.
fn ns_per_op(n: u64, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    best
}

fn add(args: (Value<i64>, u64)) {
    let (v, n) = args;
    for _ in 0..n {
        *v.lock() += 1;
    }
}

pub fn rows(_iters: usize) -> Vec<Row> {
    let n: u64 = 1_000_000;
    let py = python_json("sync.py", &[n.to_string()]);
    let py_get = |name: &str, key: &str| {
        py.iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v[key].as_f64())
    };

    let lock = Lock::new().unwrap();
    let ours = ns_per_op(n * 10, || drop(black_box(lock.acquire())));
    let mutex = std::sync::Mutex::new(());
    let std_mutex = ns_per_op(n * 10, || drop(black_box(mutex.lock().unwrap())));

    let sem = Semaphore::new(4).unwrap();
    let sem_ns = ns_per_op(n * 10, || drop(black_box(sem.acquire())));

    let v = Value::new(0i64).unwrap();
    let t = Instant::now();
    let ps: Vec<Process> = (0..2)
        .map(|_| {
            Process::builder()
                .start_method(multiprocess::StartMethod::Fork)
                .build(add, (v.clone(), n))
        })
        .collect();
    for p in &ps {
        p.start().unwrap();
    }
    for p in &ps {
        p.join().unwrap();
    }
    let value_s = t.elapsed().as_secs_f64();
    assert_eq!(v.get(), 2 * n as i64);

    vec![
        Row {
            name: "Lock acquire+release, uncontended".into(),
            unit: "ns",
            ours,
            python: py_get("lock", "ns"),
            baseline: Some(("std Mutex", std_mutex)),
        },
        Row {
            name: "Semaphore acquire+release".into(),
            unit: "ns",
            ours: sem_ns,
            python: py_get("semaphore", "ns"),
            baseline: None,
        },
        Row {
            name: "Value<i64> += 1 locked, 2 procs x 1M".into(),
            unit: "ms",
            ours: value_s * 1e3,
            python: py_get("value_2proc", "seconds").map(|s| s * 1e3),
            baseline: None,
        },
    ]
}
