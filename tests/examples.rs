//! Runs every example (as built by `cargo test`) under every start method and checks that
//! it prints what its tutorial shows.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::process::Command;

const METHODS: [&str; 3] = ["forkserver", "spawn", "fork"];

/// Runs an example with the given start method; returns its stdout lines.
fn run(name: &str, method: &str) -> Vec<String> {
    let out = Command::new(common::example_path(name))
        .env("MULTIPROCESS_START_METHOD", method)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{name} ({method}) failed with {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_string).collect()
}

fn num_after(line: &str, prefix: &str) -> u32 {
    line.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn find<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in {lines:#?}"))
}

#[test]
fn cpu_count() {
    let lines = run("cpu_count", "forkserver");
    assert_eq!(
        lines,
        vec![std::thread::available_parallelism()
            .unwrap()
            .get()
            .to_string()]
    );
}

#[test]
fn doubler() {
    for m in METHODS {
        let lines = run("doubler", m);
        assert_eq!(lines.len(), 5, "{m}: {lines:?}");
        let mut seen = BTreeSet::new();
        let mut pids = BTreeSet::new();
        for l in &lines {
            // "5 doubled to 10 by process id: 10468"
            let (n, rest) = l.split_once(" doubled to ").unwrap();
            let (r, pid) = rest.split_once(" by process id: ").unwrap();
            let (n, r): (i32, i32) = (n.parse().unwrap(), r.parse().unwrap());
            assert_eq!(r, n * 2);
            seen.insert(n);
            pids.insert(pid.parse::<u32>().unwrap());
        }
        assert_eq!(seen, BTreeSet::from([5, 10, 15, 20, 25]));
        assert_eq!(pids.len(), 5, "{m}: each number doubled by its own process");
    }
}

#[test]
fn doubler_names() {
    for m in METHODS {
        let lines: BTreeSet<String> = run("doubler_names", m).into_iter().collect();
        let expected: BTreeSet<String> = [
            "5 doubled to 10 by: Process-2",
            "10 doubled to 20 by: Process-3",
            "15 doubled to 30 by: Process-4",
            "20 doubled to 40 by: Process-5",
            "25 doubled to 50 by: Process-6",
            "2 doubled to 4 by: Test",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(lines, expected, "{m}");
    }
}

#[test]
fn square_cube() {
    for m in METHODS {
        let lines = run("square_cube", m);
        assert_eq!(lines.len(), 3, "{m}: {lines:?}");
        assert!(lines.contains(&"Square: 100".to_string()));
        assert!(lines.contains(&"Cube: 1000".to_string()));
        assert_eq!(lines[2], "Done!");
    }
}

#[test]
fn worker_ids() {
    for m in METHODS {
        let lines = run("worker_ids", m);
        assert_eq!(
            lines.len(),
            8,
            "{m}: {lines:?} (main must print once: user main never runs in a child)"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("ID of main process"))
                .count(),
            1
        );
        let main = num_after(find(&lines, "ID of main process: "), "ID of main process: ");
        let p1 = num_after(find(&lines, "ID of process p1: "), "ID of process p1: ");
        let p2 = num_after(find(&lines, "ID of process p2: "), "ID of process p2: ");
        assert_eq!(
            num_after(
                find(&lines, "ID of process running worker1: "),
                "ID of process running worker1: "
            ),
            p1
        );
        assert_eq!(
            num_after(
                find(&lines, "ID of process running worker2: "),
                "ID of process running worker2: "
            ),
            p2
        );
        assert!(main != p1 && main != p2 && p1 != p2);
        assert_eq!(
            &lines[5..],
            [
                "Both processes finished execution!",
                "Process p1 is alive: False",
                "Process p2 is alive: False"
            ]
        );
    }
}

#[test]
fn squares_serial() {
    assert_eq!(
        run("squares_serial", "forkserver"),
        vec!["[1, 4, 9, 16, 25]"]
    );
}

#[test]
fn hello() {
    for m in METHODS {
        assert_eq!(run("hello", m), vec!["hello bob"], "{m}");
    }
}

#[test]
fn info() {
    for m in METHODS {
        let lines = run("info", m);
        assert_eq!(lines.len(), 9, "{m}: {lines:?}");
        assert_eq!(lines[0], "main line");
        assert_eq!(lines[1], "module name: info");
        let main_pid = num_after(&lines[3], "process id: ");
        assert_eq!(lines[4], "function f");
        assert_eq!(lines[5], "module name: info");
        assert_eq!(
            num_after(&lines[6], "parent process: "),
            main_pid,
            "{m}: the child's parent is the main process"
        );
        assert_ne!(num_after(&lines[7], "process id: "), main_pid);
        assert_eq!(lines[8], "hello bob");
    }
}

#[test]
fn random_numbers() {
    for m in METHODS {
        let lines = run("random_numbers", m);
        // One line, a list: "[0.67..., 0.41..., 0.67..., 0.94...]"
        assert_eq!(lines.len(), 1, "{m}: {lines:?}");
        let list = lines[0]
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .unwrap_or_else(|| panic!("{m}: not a list: {:?}", lines[0]));
        let nums: Vec<f64> = list.split(", ").map(|x| x.parse().unwrap()).collect();
        assert_eq!(nums.len(), 4, "{m}: {nums:?}");
        assert!(nums.iter().all(|x| (0.0..1.0).contains(x)), "{m}: {nums:?}");
        let distinct: BTreeSet<u64> = nums.iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            distinct.len(),
            4,
            "{m}: each process puts its own random number: {nums:?}"
        );
    }
}

#[test]
fn tour_runs_every_example() {
    let lines = run("tour", "forkserver");
    let sections: Vec<&String> = lines.iter().filter(|l| l.starts_with("== ")).collect();
    assert_eq!(sections.len(), 13, "{sections:?}");
    assert!(lines.contains(&"[1, 4, 9]".to_string()));
    assert!(lines.contains(&"2 doubled to 4 by: Test".to_string()));
    assert!(lines.contains(&"Done!".to_string()));
    assert!(lines.contains(&"[1, 4, 9, 16, 25]".to_string()));
}

#[test]
fn pool_squares() {
    for m in METHODS {
        let lines = run("pool_squares", m);
        assert_eq!(lines.len(), 6, "{m}: {lines:?}");
        let mut items = BTreeSet::new();
        for l in &lines[..5] {
            let (n, pid) = l
                .strip_prefix("Worker process id for ")
                .unwrap()
                .split_once(": ")
                .unwrap();
            items.insert(n.parse::<u32>().unwrap());
            pid.parse::<u32>().unwrap();
        }
        assert_eq!(items, BTreeSet::from([1, 2, 3, 4, 5]));
        assert_eq!(lines[5], "[1, 4, 9, 16, 25]");
    }
}

#[test]
fn pool_map() {
    for m in METHODS {
        assert_eq!(run("pool_map", m), vec!["[1, 4, 9]"], "{m}");
    }
}

#[test]
fn pool_my_func() {
    for m in METHODS {
        let lines: BTreeSet<String> = run("pool_my_func", m).into_iter().collect();
        assert_eq!(
            lines,
            ["256", "4", "27"].into_iter().map(String::from).collect(),
            "{m}"
        );
    }
}

#[test]
fn pool_workers() {
    for m in METHODS {
        let lines = run("pool_workers", m);
        assert_eq!(lines.len(), 17 + 2, "{m}: {lines:?}");
        for l in &lines[..17] {
            let rest = l
                .strip_prefix("<Process name='PoolWorker-")
                .unwrap_or_else(|| panic!("{l}"));
            assert!(rest.ends_with(" started daemon>"), "{l}");
        }
        assert_eq!(lines[17], "[256, 4, 27, 3125, 27, 4, 1, 4]");
        assert_eq!(
            lines[18],
            "[256, 46656, 3125, 256, 46656, 27, 20880467999847912034355032910567, 256, 46656]"
        );
    }
}

#[test]
fn primes() {
    let out = Command::new(common::example_path("primes"))
        .arg("2000000")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("primes below 2000000: 148933"), "{text}");
    assert!(text.contains("speed-up: "), "{text}");
}

#[test]
fn echo_server_and_client() {
    use std::io::{BufRead, BufReader};
    let mut server = Command::new(common::example_path("echo_server"))
        .args([
            "--address",
            "127.0.0.1:0",
            "--authkey",
            "tour-key",
            "--once",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    let out = Command::new(common::example_path("echo_client"))
        .args(["--address", &address, "--authkey", "tour-key"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], r#"bytes:  "hello, echo""#);
    assert!(
        lines[1].starts_with("object: ") && lines[1].contains("obj") && lines[1].contains("2.5"),
        "{text}"
    );
    // A wrong key is refused.
    let mut server = Command::new(common::example_path("echo_server"))
        .args(["--address", "127.0.0.1:0", "--authkey", "right", "--once"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let out = Command::new(common::example_path("echo_client"))
        .args(["--address", &address, "--authkey", "wrong"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("digest sent was rejected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shared_state() {
    for method in METHODS {
        let lines = run("shared_state", method);
        assert_eq!(
            lines,
            [
                "counter: 4000",
                "num: 2.5",
                "arr: [0, -1, -2, -3, -4, -5, -6, -7, -8, -9]",
                "shared memory says: hello from a child",
            ],
            "{method}"
        );
    }
}

#[test]
fn manager_counter() {
    for m in METHODS {
        let lines = run("manager_counter", m);
        assert_eq!(
            lines,
            ["cat: 1", "end: 1", "mat: 1", "on: 1", "sat: 1", "the: 3"],
            "{m}"
        );
    }
}

#[test]
fn manager_server_serves_a_cpython_syncmanager() {
    use std::io::{BufRead, BufReader};
    let mut server = Command::new(common::example_path("manager_server"))
        .args(["--address", "127.0.0.1:0", "--authkey", "ex-key"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("serving on 127.0.0.1:")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    let script = r#"
import sys
from multiprocessing.managers import SyncManager, dispatch
class MyManager(SyncManager):
    pass
m = MyManager(address=('127.0.0.1', int(sys.argv[1])), authkey=b'ex-key')
m.connect()
d = m.dict()
d['answer'] = 42
q = m.Queue()
q.put('job')
print(d['answer'], len(d), q.get())
dispatch(m._Client(m._address, authkey=m._authkey), None, 'shutdown')
"#;
    let py = Command::new("python3")
        .args(["-c", script, &port])
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "42 1 job");
    // The CPython client's shutdown stops the Rust server.
    let mut rest = String::new();
    out.read_line(&mut rest).unwrap();
    assert_eq!(rest.trim(), "shut down");
    assert!(server.wait().unwrap().success());
}

#[test]
fn log_to_stderr() {
    for m in METHODS {
        let out = Command::new(common::example_path("log_to_stderr"))
            .env("MULTIPROCESS_START_METHOD", m)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{m}: {stdout}\n{stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 5, "{m}: {lines:?}");
        assert_eq!(lines[0], "0 -> 0");
        assert_eq!(lines[4], "4 -> 40");
        assert!(lines[3].starts_with("3 -> failed: "), "{m}: {}", lines[3]);
        assert!(lines[3].contains("SIGABRT"), "{m}: {}", lines[3]);
        // The pool's log: workers started, the death (a WARN naming the signal and the
        // task), the replacement, and the workers' exit at close.
        assert!(stderr.contains("pool worker started"), "{m}: {stderr}");
        let died = stderr
            .lines()
            .find(|l| l.contains("pool worker died"))
            .unwrap_or_else(|| panic!("{m}: no death in {stderr}"));
        assert!(
            died.contains("WARN") && died.contains("SIGABRT") && died.contains("task=3"),
            "{m}: {died}"
        );
        assert!(stderr.contains("pool worker replaced"), "{m}: {stderr}");
        assert!(stderr.contains("pool worker exited"), "{m}: {stderr}");
    }
}
