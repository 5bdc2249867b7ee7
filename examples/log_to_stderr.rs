//! Python's `multiprocessing.log_to_stderr()`: see what the pool does. The crate records
//! `tracing` events under the target `multiprocess` (workers started, exited, died,
//! replaced; tasks retried, timed out, cancelled) and prints nothing by itself; a program
//! that wants them installs a subscriber, here `tracing-subscriber`'s, on stderr.
//!
//! The results go to stdout; the pool's log to stderr, e.g.
//! `WARN map: multiprocess: pool worker died with SIGABRT worker=PoolWorker-2 pid=... task=3`.

use multiprocess::Pool;

fn risky(x: u32) -> u32 {
    if x == 3 {
        // A crash in native code, say: the worker dies, the pool replaces it.
        std::process::abort();
    }
    x * 10
}

fn main() -> multiprocess::Result<()> {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    let pool = Pool::new(2)?;
    for (x, r) in (0..5).zip(pool.imap(risky, 0..5)?) {
        match r {
            Ok(v) => println!("{x} -> {v}"),
            Err(e) => println!("{x} -> failed: {e}"),
        }
    }
    pool.close();
    pool.join()
}
