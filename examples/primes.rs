//! A real CPU-bound job: count the primes below N (default 10 million) by trial division,
//! once in this process and once spread over a `Pool`, and print the speed-up.
//!
//! `cargo run --release --example primes -- 100000000`

use multiprocess::{cpu_count, Pool};
use std::time::Instant;

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// Counts the primes in `[lo, hi)` by trial division: honest CPU work.
fn count_segment((lo, hi): (u64, u64)) -> u64 {
    (lo..hi).filter(|&n| is_prime(n)).count() as u64
}

pub fn main() -> multiprocess::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let segments: Vec<(u64, u64)> = (0..n)
        .step_by(100_000)
        .map(|lo| (lo, (lo + 100_000).min(n)))
        .collect();

    let t = Instant::now();
    let serial: u64 = segments.iter().copied().map(count_segment).sum();
    let one = t.elapsed();

    let workers = cpu_count();
    let pool = Pool::new(workers)?;
    let t = Instant::now();
    let parallel: u64 = pool
        .map_chunked(count_segment, segments, 1)?
        .into_iter()
        .sum();
    let many = t.elapsed();

    assert_eq!(serial, parallel);
    println!("primes below {n}: {parallel}");
    println!("one process: {:.3} s", one.as_secs_f64());
    println!("{workers} workers: {:.3} s", many.as_secs_f64());
    println!("speed-up: {:.2}x", one.as_secs_f64() / many.as_secs_f64());
    Ok(())
}
