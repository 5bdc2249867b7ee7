//! A `python3` peer for the tests that talk to CPython.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a test waits for CPython to say something.
pub const LIMIT: Duration = Duration::from_secs(30);

/// A `python3` child whose stdout lines arrive with a bounded wait.
pub struct Py {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Py {
    pub fn run(script: &str, args: &[&str]) -> Py {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Py { child, lines }
    }

    pub fn line(&self) -> String {
        self.lines
            .recv_timeout(LIMIT)
            .expect("python printed a line in time")
    }

    pub fn expect(&self, prefix: &str) -> String {
        let l = self.line();
        assert!(
            l.starts_with(prefix),
            "expected {prefix:?}, python said {l:?}"
        );
        l[prefix.len()..].trim().to_string()
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "python did not exit in time");
            // Polling an exit status: the child has no other way to tell us.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn finish(mut self) {
        assert!(self.lines.recv_timeout(LIMIT).is_err(), "python said more");
        let st = self.child.wait().unwrap();
        assert!(st.success(), "python exited with {st}");
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on a thread and fails the test if it takes longer than [`LIMIT`].
pub fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(LIMIT).expect("finished in time")
}
