//! Pool throughput (tiny-task map) and apply_async latency, against CPython's Pool.

use crate::{python_json, Row};
use multiprocess::Pool;
use std::time::{Duration, Instant};

fn square(x: i64) -> i64 {
    x * x
}

pub fn rows(_iters: usize) -> Vec<Row> {
    let workers = 2;
    let items = 1_000_000i64;
    let pool = Pool::builder().processes(workers).build().unwrap();
    pool.map(square, 0..1000i64).unwrap();
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let v = pool.map(square, 0..items).unwrap();
        best = best.min(t.elapsed());
        assert_eq!(v.len(), items as usize);
    }
    // Warm up as the CPython side does (see pool.py).
    for i in 0..500 {
        pool.apply_async(square, i).unwrap().get().unwrap();
    }
    // Best of three batches (a shared virtual machine has slow spells), as in pool.py.
    let n = 1000;
    let mut apply = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for i in 0..n {
            assert_eq!(pool.apply_async(square, i).unwrap().get().unwrap(), i * i);
        }
        apply = apply.min(t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    drop(pool);
    let py = python_json("pool.py", &[workers.to_string(), items.to_string()]);
    let py_get = |name: &str, key: &str| {
        py.iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v[key].as_f64())
    };
    vec![
        Row {
            name: format!("pool.map(x*x) over 1M, {workers} workers"),
            unit: "ms",
            ours: best.as_secs_f64() * 1e3,
            python: py_get("map", "seconds").map(|s| s * 1e3),
            baseline: None,
        },
        Row {
            name: "apply_async(..).get() round trip".into(),
            unit: "us",
            ours: apply,
            python: py_get("apply_async", "mean_us"),
            baseline: None,
        },
    ]
}
