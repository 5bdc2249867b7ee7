//! Counts the primes below 100 million (or the number given as the first argument; the
//! second, if any, is the number of workers in all) with a `Pool`: on one machine when run directly, across every host of an MPI job when started
//! by `mpirun`/`srun` (build with `--features mpi`). The program is the same.
//!
//! ```text
//! cargo build --release --features mpi --example mpi_primes
//! mpirun -n 3 --oversubscribe target/release/examples/mpi_primes
//! ```

use multiprocess::Pool;
use std::collections::BTreeMap;

/// Numbers per task.
const BLOCK: u64 = 1_000_000;

/// The host a task ran on.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Primes in `[lo, hi)`, by a sieve of that segment with the primes up to `sqrt(hi)`.
fn count_block(lo: u64, hi: u64) -> (u64, String) {
    let root = (hi as f64).sqrt() as u64 + 1;
    let mut small = vec![true; root as usize + 1];
    let mut base = Vec::new();
    for i in 2..=root {
        if small[i as usize] {
            base.push(i);
            let mut j = i * i;
            while j <= root {
                small[j as usize] = false;
                j += i;
            }
        }
    }
    let mut seg = vec![true; (hi - lo) as usize];
    for &p in &base {
        let mut j = (lo.div_ceil(p) * p).max(p * p);
        while j < hi {
            seg[(j - lo) as usize] = false;
            j += p;
        }
    }
    let count = seg
        .iter()
        .enumerate()
        .filter(|&(i, &is)| is && lo + i as u64 >= 2)
        .count() as u64;
    (count, hostname())
}

fn main() -> multiprocess::Result<()> {
    let limit: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000_000);
    let workers: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let pool = Pool::new(workers)?;
    let blocks: Vec<(u64, u64)> = (0..limit)
        .step_by(BLOCK as usize)
        .map(|lo| (lo, (lo + BLOCK).min(limit)))
        .collect();
    let started = std::time::Instant::now();
    let results = pool.starmap(count_block, blocks)?;
    let total: u64 = results.iter().map(|(n, _)| n).sum();
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for (_, host) in &results {
        *per_host.entry(host.clone()).or_default() += 1;
    }
    println!("primes below {limit}: {total}");
    println!(
        "{} workers, {:.2} s",
        pool.processes(),
        started.elapsed().as_secs_f64()
    );
    for (host, n) in per_host {
        println!("  {host}: {n} blocks");
    }
    Ok(())
}
