//! Process start+join per start method, against CPython and the bare OS floor.

use crate::{median_us, python_json, Row};
use multiprocess::{get_context, StartMethod};

/// The bare OS costs that the process workloads are measured against.
mod bare {
    /// `fork()`, `_exit(0)` in the child, `waitpid()` in the parent.
    pub fn fork_exit_wait() {
        // SAFETY: the child only calls _exit, which is async-signal-safe; the parent waits
        // for exactly that child.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                libc::_exit(0);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
    }

    /// A fresh image of this binary that exits at once: the floor under `Spawn`.
    pub fn reexec() {
        let status = std::process::Command::new("/proc/self/exe")
            .env(crate::EXIT_AT_ONCE, "1")
            .status()
            .expect("re-exec");
        assert!(status.success());
    }
}

fn empty() {}

pub fn rows(iters: usize) -> Vec<Row> {
    let py = python_json("process.py", &[iters.to_string()]);
    let py_us = |m: &str| {
        py.iter()
            .find(|v| v["method"] == m)
            .and_then(|v| v["median_us"].as_f64())
    };
    // The floor in a fresh process too: one thread, nothing started yet (the cheapest fork
    // there is; the rows below alternate with a fork from the process as it is then).
    let fresh_floor = median_us(iters, bare::fork_exit_wait);
    let mut rows = Vec::new();
    for (m, py_name) in [
        (StartMethod::Forkserver, "forkserver"),
        (StartMethod::Fork, "fork"),
        (StartMethod::Spawn, "spawn"),
    ] {
        let ctx = get_context(m);
        let run = || {
            let p = ctx.process(empty, ());
            p.start().unwrap();
            p.join().unwrap();
        };
        for _ in 0..5 {
            run();
        }
        let n = if m == StartMethod::Spawn {
            (iters / 4).max(10)
        } else {
            iters
        };
        // Ours and the bare floor alternate, so that both are measured in the same state
        // of this process and of the machine (a load that comes and goes hits both alike).
        let (what, floor): (&str, fn()) = match m {
            StartMethod::Spawn => ("re-exec", bare::reexec),
            _ => ("fork+exit+wait", bare::fork_exit_wait),
        };
        let mut ours_runs = Vec::with_capacity(n);
        let mut floor_runs = Vec::with_capacity(n);
        for _ in 0..n {
            ours_runs.push(median_us(1, run));
            floor_runs.push(median_us(1, floor));
        }
        let ours = median(ours_runs);
        let baseline = (what, median(floor_runs));
        rows.push(Row {
            name: format!("process start+join ({m})"),
            unit: "us",
            ours,
            python: py_us(py_name),
            baseline: Some(baseline),
        });
    }
    if let Some(fs) = rows
        .iter()
        .find(|r| r.name.contains("forkserver"))
        .map(|r| r.ours)
    {
        rows.push(Row {
            name: "forkserver vs a fork from a fresh process".into(),
            unit: "us",
            ours: fs,
            python: None,
            baseline: Some(("fresh fork+exit+wait", fresh_floor)),
        });
    }
    // Spawn against CPython's fork, as the issue asks.
    if let (Some(spawn), Some(cpy_fork)) = (
        rows.iter()
            .find(|r| r.name.contains("spawn"))
            .map(|r| r.ours),
        py_us("fork"),
    ) {
        rows.push(Row {
            name: "our spawn vs CPython fork".into(),
            unit: "us",
            ours: spawn,
            python: Some(cpy_fork),
            baseline: None,
        });
    }
    rows
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
