//! The CPU-bound primes job (trial division below N, in 100k segments): parallel
//! efficiency (speed-up over one thread ÷ workers) of a `Pool` against rayon's on the same
//! job, machine and run. The row's "ours" and "baseline" are efficiencies in percent;
//! the ratio column is ours ÷ rayon's.

use crate::Row;
use multiprocess::{cpu_count, Pool};
use rayon::prelude::*;
use std::time::Instant;

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn count_segment((lo, hi): (u64, u64)) -> u64 {
    (lo..hi).filter(|&n| is_prime(n)).count() as u64
}

/// One timed run of `f`, in seconds, checking it gives `expect`.
fn timed(expect: u64, f: impl Fn() -> u64) -> f64 {
    let t = Instant::now();
    assert_eq!(f(), expect);
    t.elapsed().as_secs_f64()
}

pub fn rows(_iters: usize) -> Vec<Row> {
    let n = 20_000_000u64;
    let segments: Vec<(u64, u64)> = (0..n)
        .step_by(100_000)
        .map(|lo| (lo, (lo + 100_000).min(n)))
        .collect();
    let workers = cpu_count();
    let expect: u64 = segments.iter().copied().map(count_segment).sum();
    let pool = Pool::new(workers).unwrap();
    let rayon_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .unwrap();
    // The three are interleaved, best of five each, so that a load that comes and goes on
    // a shared machine hits them alike.
    let (mut serial, mut ours, mut rayon) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..5 {
        serial = serial.min(timed(expect, || {
            segments.iter().copied().map(count_segment).sum()
        }));
        ours = ours.min(timed(expect, || {
            pool.map_chunked(count_segment, segments.clone(), 1)
                .unwrap()
                .into_iter()
                .sum()
        }));
        rayon = rayon.min(timed(expect, || {
            rayon_pool.install(|| segments.par_iter().copied().map(count_segment).sum())
        }));
    }
    let eff = |t: f64| serial / t / workers as f64 * 100.0;
    // On stderr: stdout is the table (`--markdown` output goes into the README).
    eprintln!(
        "  primes below {n}: one thread {serial:.3} s, pool {ours:.3} s, rayon {rayon:.3} s, {workers} workers"
    );
    vec![Row {
        name: format!("primes efficiency %, {workers} workers"),
        unit: "%",
        ours: eff(ours),
        python: None,
        baseline: Some(("rayon", eff(rayon))),
    }]
}
