//! Process start+join per start method, against CPython (its fastest start method, `fork`,
//! for our default; the same method otherwise), procspawn (the Rust peer) and the bare OS
//! floor.

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

    /// `n` [`fork_exit_wait`]s, each in microseconds, measured in a fresh process (this
    /// binary again, before it starts anything): one thread, a small address space, the
    /// cheapest fork there is.
    pub fn fresh_fork_exit_wait(n: usize) -> Vec<f64> {
        let out = std::process::Command::new("/proc/self/exe")
            .env(super::FORK_FLOOR, n.to_string())
            .output()
            .expect("re-exec");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|t| t.parse().expect("a number"))
            .collect()
    }

    /// A bare forkserver: a fresh image of this binary that, for each byte it reads on
    /// its socket, forks a child with `CLONE_PARENT` (a child of the caller, as our
    /// forkserver's are) that exits at once, and writes back the child's pid. The floor
    /// under a start that hops through a server: one request, one fork, one reply, one
    /// wait, nothing else.
    pub struct ServerHop {
        sock: std::os::unix::net::UnixStream,
        _server: std::process::Child,
    }

    impl ServerHop {
        pub fn start() -> ServerHop {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            let fd = theirs.as_raw_fd();
            let mut cmd = std::process::Command::new("/proc/self/exe");
            cmd.env(super::SERVER_HOP, "1");
            // SAFETY: between fork and exec the closure only calls dup2, which is
            // async-signal-safe; it puts the server's end at descriptor 3 without
            // close-on-exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let server = cmd.spawn().expect("re-exec");
            drop(theirs);
            ServerHop {
                sock: ours,
                _server: server,
            }
        }

        /// One start and join through the server.
        pub fn start_join(&self) {
            use std::io::{Read, Write};
            (&self.sock).write_all(&[1]).expect("request");
            let mut pid = [0u8; 4];
            (&self.sock).read_exact(&mut pid).expect("reply");
            let mut status = 0;
            // SAFETY: waits for the child the server made ours; no memory is shared.
            unsafe { libc::waitpid(i32::from_le_bytes(pid), &mut status, 0) };
        }
    }

    /// The server's side of [`ServerHop`] (descriptor 3); returns at end of file.
    pub fn serve_hops() {
        let mut byte = [0u8; 1];
        loop {
            // SAFETY: reads into a live one-byte buffer from the inherited descriptor.
            if unsafe { libc::read(3, byte.as_mut_ptr().cast(), 1) } != 1 {
                return;
            }
            // SAFETY: this process is single-threaded (it serves before anything else
            // starts); the child only calls _exit.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    libc::CLONE_PARENT as libc::c_ulong,
                    0,
                    0,
                    0,
                    0,
                )
            };
            if pid == 0 {
                // SAFETY: _exit is async-signal-safe and ends the child.
                unsafe { libc::_exit(0) };
            }
            let reply = (pid as i32).to_le_bytes();
            // SAFETY: writes a live four-byte buffer to the inherited descriptor.
            unsafe { libc::write(3, reply.as_ptr().cast(), 4) };
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

/// Set to a count, this binary measures [`bare::fork_exit_wait`] that many times as soon
/// as it starts, prints each time and exits.
const FORK_FLOOR: &str = "MP_BENCH_FORK_FLOOR";

/// Set, this binary is the server of [`bare::ServerHop`].
const SERVER_HOP: &str = "MP_BENCH_SERVER_HOP";

/// Called first in `main`: the fresh process of [`bare::fresh_fork_exit_wait`], or the
/// server of [`bare::ServerHop`].
pub fn fork_floor_if_asked() {
    if std::env::var_os(SERVER_HOP).is_some() {
        bare::serve_hops();
        std::process::exit(0);
    }
    if let Some(n) = std::env::var_os(FORK_FLOOR) {
        let n = n.to_str().and_then(|s| s.parse().ok()).unwrap_or(100);
        let times: Vec<String> = (0..n)
            .map(|_| median_us(1, bare::fork_exit_wait).to_string())
            .collect();
        println!("{}", times.join(" "));
        std::process::exit(0);
    }
}

/// procspawn's `spawn` + `join` (it starts a fresh image of this binary, as `Spawn` does).
fn procspawn_start_join() {
    procspawn::spawn((), |()| ()).join().unwrap();
}

pub fn rows(iters: usize) -> Vec<Row> {
    let py = python_json("process.py", &[iters.to_string()]);
    let py_us = |m: &str| {
        py.iter()
            .find(|v| v["method"] == m)
            .and_then(|v| v["median_us"].as_f64())
    };
    let mut rows = Vec::new();
    let hop = bare::ServerHop::start();
    for _ in 0..5 {
        hop.start_join();
    }
    let mut hop_runs = Vec::with_capacity(iters);
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
        // of this process and of the machine (a load that comes and goes hits both alike,
        // and whole runs on this VM differ by ±20%). In blocks of runs, not run by run:
        // the in-process floor forks this process, which write-protects every page of it,
        // and a start measured right after it would pay a page fault for each page it
        // writes (about 7% of a start), a cost that comes from the floor, not from
        // starting a process; only the first run of a block pays it, and the median
        // leaves it out. Our default is held to the cheapest fork there is: a fresh
        // process's, one block of it per block of ours.
        let what = match m {
            StartMethod::Forkserver => "fresh fork+exit+wait",
            StartMethod::Fork => "fork+exit+wait",
            StartMethod::Spawn => "re-exec",
        };
        let mut ours_runs = Vec::with_capacity(n);
        let mut floor_runs = Vec::with_capacity(n);
        const BLOCK: usize = 20;
        for _ in 0..n.div_ceil(BLOCK) {
            for _ in 0..BLOCK {
                ours_runs.push(median_us(1, run));
            }
            match m {
                StartMethod::Forkserver => {
                    floor_runs.extend(bare::fresh_fork_exit_wait(BLOCK));
                    hop_runs.extend((0..BLOCK).map(|_| median_us(1, || hop.start_join())));
                }
                StartMethod::Fork => {
                    floor_runs.extend((0..BLOCK).map(|_| median_us(1, bare::fork_exit_wait)))
                }
                StartMethod::Spawn => {
                    floor_runs.extend((0..BLOCK).map(|_| median_us(1, bare::reexec)))
                }
            }
        }
        let ours = median(ours_runs);
        let baseline = (what, median(floor_runs));
        rows.push(Row {
            name: format!("process start+join ({m}) vs CPython {py_name}"),
            unit: "us",
            ours,
            python: py_us(py_name),
            baseline: Some(baseline),
        });
    }
    // Our default (forkserver) against CPython's fastest start method (fork) and its
    // 3.14 default, against procspawn, and against the cheapest bare fork.
    let fs = rows[0].ours;
    for _ in 0..5 {
        procspawn_start_join();
    }
    let procspawn = median_us((iters / 4).max(10), procspawn_start_join);
    rows[0].name = "process start+join (forkserver, default) vs CPython fork".into();
    rows[0].python = py_us("fork");
    rows.insert(
        1,
        Row {
            name: "  same, vs CPython forkserver (3.14 default)".into(),
            unit: "us",
            ours: fs,
            python: py_us("forkserver"),
            baseline: None,
        },
    );
    rows.insert(
        2,
        Row {
            name: "  same, vs a bare forkserver hop (request, CLONE_PARENT fork, reply)".into(),
            unit: "us",
            ours: fs,
            python: None,
            baseline: Some(("bare server hop", median(hop_runs))),
        },
    );
    rows.insert(
        3,
        Row {
            name: "  same, vs procspawn spawn+join (Rust)".into(),
            unit: "us",
            ours: fs,
            python: Some(procspawn),
            baseline: None,
        },
    );
    // Spawn (a fresh image) against CPython's fork too.
    if let Some(spawn) = rows
        .iter()
        .find(|r| r.name.contains("(spawn)"))
        .map(|r| r.ours)
    {
        rows.push(Row {
            name: "our spawn vs CPython fork".into(),
            unit: "us",
            ours: spawn,
            python: py_us("fork"),
            baseline: None,
        });
    }
    rows
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
