//! Pool on MPI (feature `mpi`): tiny-task `map` throughput under `mpirun -n 3` (rank 0 and
//! two agents on this machine), against mpi4py.futures' `MPIPoolExecutor.map` with the same
//! ranks (`pip install mpi4py`).
//!
//! ```text
//! cargo run --release --manifest-path bench/Cargo.toml --features mpi -- --only mpi
//! ```

use crate::Row;
use multiprocess::Pool;
use std::process::Command;
use std::time::{Duration, Instant};

/// Items for mpi4py's default `map` (chunksize 1: a message per item).
const ITEMS: u64 = 20_000;
/// Items when both sides send the same chunks.
const ITEMS_CHUNKED: u64 = 1_000_000;

fn square(x: u64) -> u64 {
    x * x
}

fn mpirun() -> Command {
    let mut c = Command::new("timeout");
    c.args([
        "600",
        "mpirun",
        "-n",
        "3",
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn json_lines(out: std::process::Output, what: &str) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Called first thing in `main`: under `mpirun`, rank 0 measures and exits (the other
/// ranks never reach `main`: they are the pool's agents).
pub fn inner_if_launched() {
    if !multiprocess::mpi::is_launched() {
        return;
    }
    let pool = Pool::new(0).unwrap();
    pool.map(square, 0..1000u64).unwrap();
    let workers = pool.processes();
    for (items, chunksize) in [
        (ITEMS, 0usize),
        (
            ITEMS_CHUNKED,
            (ITEMS_CHUNKED as usize).div_ceil(4 * workers),
        ),
    ] {
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let v = if chunksize == 0 {
                pool.map(square, 0..items).unwrap()
            } else {
                pool.map_chunked(square, 0..items, chunksize).unwrap()
            };
            best = best.min(t.elapsed());
            assert_eq!(v.len(), items as usize);
        }
        println!(
            "{}",
            serde_json::json!({"items": items, "chunksize": chunksize, "workers": workers, "seconds": best.as_secs_f64()})
        );
    }
    drop(pool);
    std::process::exit(0);
}

pub fn rows(_iters: usize) -> Vec<Row> {
    let exe = std::env::current_exe().unwrap();
    let ours = json_lines(mpirun().arg(exe).output().unwrap(), "the MPI job");
    let workers = ours[0]["workers"].as_u64().unwrap();
    let explicit = ours[1]["chunksize"].as_u64().unwrap();
    let script = format!("{}/py/mpi.py", env!("CARGO_MANIFEST_DIR"));
    let mut py = Vec::new();
    for (items, chunksize) in [(ITEMS, 1), (ITEMS_CHUNKED, explicit)] {
        py.extend(json_lines(
            mpirun()
                .args(["python3", "-m", "mpi4py.futures", &script])
                .args([items.to_string(), chunksize.to_string()])
                .output()
                .unwrap(),
            "mpi4py.futures (pip install mpi4py)",
        ));
    }
    let py_secs = |c: u64| {
        py.iter()
            .find(|v| v["chunksize"].as_u64() == Some(c))
            .and_then(|v| v["seconds"].as_f64())
    };
    vec![
        Row {
            name: format!("MPI map 20k tiny, {workers} wk, defaults"),
            unit: "ms",
            ours: ours[0]["seconds"].as_f64().unwrap() * 1e3,
            python: py_secs(1).map(|s| s * 1e3),
            baseline: None,
        },
        Row {
            name: format!("MPI map 1M tiny, chunksize {explicit}"),
            unit: "ms",
            ours: ours[1]["seconds"].as_f64().unwrap() * 1e3,
            python: py_secs(explicit).map(|s| s * 1e3),
            baseline: None,
        },
    ]
}
