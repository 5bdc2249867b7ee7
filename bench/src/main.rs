//! Side-by-side benchmarks: the same workload with `multiprocess`, with CPython's
//! `multiprocessing`, and (where there is one) with the bare OS mechanism, in one run.
//!
//! ```text
//! cargo run --release --manifest-path bench/Cargo.toml             # everything
//! cargo run --release --manifest-path bench/Cargo.toml -- --only process --iters 300
//! ```
//!
//! Add a workload: write a function returning `Vec<Row>` (ours, CPython's number from a
//! script in `bench/py/`, and a baseline if any), put it in a module under `src/workloads/`, and list
//! it in `WORKLOADS`.

mod echo;
mod workloads;

use std::process::Command;
use std::time::Instant;

/// One line of the table: per-operation times in microseconds (or seconds, see `unit`).
pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub ours: f64,
    /// The peer's time: CPython's, unless the row's name says which peer (`vs procspawn`).
    pub python: Option<f64>,
    /// The bare floor: what the OS mechanism alone costs for the same work.
    pub baseline: Option<(&'static str, f64)>,
}

type Workload = (&'static str, fn(usize) -> Vec<Row>);

/// Every workload, by the name `--only` takes. One line per workload module.
const WORKLOADS: &[Workload] = &[
    ("process", workloads::process::rows),
    ("pool", workloads::pool::rows),
    ("primes", workloads::primes::rows),
    ("sync", workloads::sync::rows),
    ("queue", workloads::queue::rows),
    ("connection", workloads::connection::rows),
    ("bulk", workloads::bulk::rows),
    ("bulk-big", workloads::bulk::big_rows),
    ("bulk-pool", workloads::bulk_pool::rows),
    #[cfg(feature = "mpi")]
    ("mpi", workloads::mpi::rows),
    ("managers", workloads::managers::rows),
];

pub const EXIT_AT_ONCE: &str = "MP_BENCH_EXIT_AT_ONCE";

fn main() {
    // A child started by procspawn (the process-start peer) runs its closure here.
    procspawn::init();
    workloads::process::fork_floor_if_asked();
    #[cfg(feature = "mpi")]
    workloads::mpi::inner_if_launched();
    // The bare re-exec baseline runs this binary again and wants it to end at once.
    if std::env::var_os(EXIT_AT_ONCE).is_some() {
        std::process::exit(0);
    }
    let mut only = None;
    let mut iters = 200usize;
    let mut markdown = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--only" => only = args.next(),
            "--iters" => iters = args.next().and_then(|s| s.parse().ok()).expect("--iters N"),
            "--markdown" => markdown = true,
            other => panic!("unknown argument {other:?}; use --only NAME, --iters N, --markdown"),
        }
    }
    if markdown {
        println!("| workload | ours | peer | peer/ours | bare floor | ours/floor |");
        println!("|---|---|---|---|---|---|");
    } else {
        println!(
            "{:<58} {:>12} {:>12} {:>10} {:>36}",
            "workload", "ours", "peer", "peer/ours", "bare floor (ours/floor)"
        );
    }
    for (name, run) in WORKLOADS {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        for row in run(iters) {
            print_row(&row, markdown);
        }
    }
}

/// One row: aligned columns for a terminal, or a Markdown table row (`--markdown`, for
/// the README's table).
fn print_row(row: &Row, markdown: bool) {
    let ratio = row
        .python
        .map(|p| format!("{:.1}x", p / row.ours))
        .unwrap_or_default();
    let ours = format!("{:.1} {}", row.ours, row.unit);
    let py = row
        .python
        .map(|p| format!("{p:.1} {}", row.unit))
        .unwrap_or_else(|| "-".into());
    if markdown {
        let (floor, vs) = row
            .baseline
            .map(|(what, b)| {
                (
                    format!("{what} {b:.1} {}", row.unit),
                    format!("{:.2}x", row.ours / b),
                )
            })
            .unwrap_or_default();
        println!(
            "| {} | {ours} | {py} | {ratio} | {floor} | {vs} |",
            row.name.trim()
        );
        return;
    }
    let base = row
        .baseline
        .map(|(what, b)| format!("{what} {b:.1} {} ({:.2}x)", row.unit, row.ours / b))
        .unwrap_or_default();
    println!(
        "{:<58} {:>12} {:>12} {:>10} {:>36}",
        row.name, ours, py, ratio, base
    );
}

/// Median of `n` runs of `f`, in microseconds.
pub fn median_us(n: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

pub fn python_json(script: &str, args: &[String]) -> Vec<serde_json::Value> {
    let path = format!("{}/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
