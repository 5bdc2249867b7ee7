//! Shared by the integration tests.

pub mod py;

/// Runs each named scenario `fn name(m: StartMethod)` as three tests, one per start method.
#[macro_export]
macro_rules! each_method {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use multiprocess::StartMethod;
                #[test]
                fn fork() {
                    super::$name(StartMethod::Fork)
                }
                #[test]
                fn spawn() {
                    super::$name(StartMethod::Spawn)
                }
                #[test]
                fn forkserver() {
                    super::$name(StartMethod::Forkserver)
                }
            }
        )*
    };
}

use multiprocess::Process;
use std::time::{Duration, Instant};

/// How long a test waits for anything before it fails.
#[allow(dead_code)]
pub const LONG: Duration = Duration::from_secs(60);

/// Kills and reaps the child if the test fails halfway, so no child outlives the test
/// binary (which would wait for it at exit).
#[allow(dead_code)]
pub struct Reaper(pub Process);

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.0.pid().is_some() {
            let _ = self.0.kill();
            let _ = self.0.join_timeout(LONG);
        }
    }
}

/// Joins `p` (bounded by [`LONG`]) and returns its exit code.
#[allow(dead_code)]
pub fn joined(p: &Process) -> i32 {
    assert!(
        p.join_timeout(LONG).expect("join"),
        "child did not end within {LONG:?}"
    );
    p.exitcode().expect("exit code after join")
}

/// Polls `cond` until it holds, for at most `within`; returns whether it did. For events
/// that give nothing to block on (a /proc entry, a file in /dev/shm).
#[allow(dead_code)]
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// The path of the example binary `name`, built by `cargo test` next to the test binaries.
#[allow(dead_code)]
pub fn example_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} should have been built by `cargo test`",
        path.display()
    );
    path
}
