//! Manager round trips (dict set+get) and manager start+shutdown, against CPython's
//! `multiprocessing.Manager()`; plus a CPython client talking to the Rust server.

use crate::{median_us, python_json, Row};
use multiprocess::connection::AuthKey;
use multiprocess::managers::{Manager, Server};
use multiprocess::{pipe, Connection, Process};

/// Echoes every message until the peer hangs up: the floor under a manager call.
fn echo(conn: Connection) {
    while let Ok(m) = conn.recv_bytes() {
        if conn.send_bytes(&m).is_err() {
            break;
        }
    }
}

/// Two small-message round trips to another process over a socket pair, in us.
fn bare_two_round_trips(iters: usize) -> f64 {
    let (ours, theirs) = pipe().unwrap();
    let p = Process::new(echo, theirs);
    p.start().unwrap();
    let msg = [7u8; 48];
    let t = median_us(iters, || {
        for _ in 0..2 {
            ours.send_bytes(&msg).unwrap();
            assert_eq!(ours.recv_bytes().unwrap().len(), 48);
        }
    });
    drop(ours);
    p.join().unwrap();
    t
}

pub fn rows(iters: usize) -> Vec<Row> {
    let iters = iters.max(200) * 10;
    // A Rust server in this process for the CPython client row, on a Unix socket as
    // CPython's own Manager() uses.
    let path = std::env::temp_dir().join(format!("mp-bench-manager-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let server = Server::sync_manager(path.as_path(), Some(AuthKey::from("bench"))).unwrap();
    let stop = server.stop_handle();
    let serving = std::thread::spawn(move || server.serve_forever());
    let py = python_json(
        "managers.py",
        &[
            iters.to_string(),
            path.display().to_string(),
            "bench".into(),
        ],
    );
    stop.stop();
    let _ = serving.join();
    let py_get = |name: &str, key: &str| {
        py.iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v[key].as_f64())
    };

    let manager = Manager::start().unwrap();
    let d = manager.dict::<String, i64>().unwrap();
    let key = "k".to_string();
    let mut i = 0i64;
    let mut setget = || {
        d.insert(&key, &i).unwrap();
        assert_eq!(d.get(&key).unwrap(), Some(i));
        i += 1;
    };
    median_us(200, &mut setget);
    let ours_setget = median_us(iters, &mut setget);
    drop(d);
    manager.shutdown().unwrap();

    let starts = (iters / 100).max(5);
    let ours_start = median_us(starts, || {
        let m = Manager::start().unwrap();
        m.shutdown().unwrap();
    }) / 1e3;

    vec![
        Row {
            name: "manager dict d[k]=v; d[k] round trip".into(),
            unit: "us",
            ours: ours_setget,
            python: py_get("dict_setget", "median_us"),
            baseline: Some(("2 socket round trips", bare_two_round_trips(iters))),
        },
        Row {
            name: "manager dict, CPython client -> Rust server".into(),
            unit: "us",
            ours: py_get("dict_setget_rust_server", "median_us").unwrap_or(f64::NAN),
            python: py_get("dict_setget", "median_us"),
            baseline: None,
        },
        Row {
            name: "Manager start + shutdown".into(),
            unit: "ms",
            ours: ours_start,
            python: py_get("start_shutdown", "median_ms"),
            baseline: None,
        },
    ]
}
