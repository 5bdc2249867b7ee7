//! A manager server with CPython's `SyncManager` type ids, which an unmodified CPython
//! program can use as it would a CPython manager.
//!
//! ```text
//! cargo run --example manager_server -- --address 127.0.0.1:50000 --authkey secret
//! python3 -c "
//! from multiprocessing.managers import SyncManager
//! m = SyncManager(address=('127.0.0.1', 50000), authkey=b'secret'); m.connect()
//! d = m.dict(); d['answer'] = 42; print(d['answer'], len(d))
//! q = m.Queue(); q.put('job'); print(q.get())"
//! ```
//!
//! Prints `serving on HOST:PORT` once bound, and serves until a client sends
//! `shutdown` (CPython: `multiprocessing.managers.dispatch(conn, None, 'shutdown')`,
//! Rust: `Manager::connect(..)?.shutdown()`).

use multiprocess::connection::AuthKey;
use multiprocess::managers::Server;
use std::io::Write;

fn main() -> multiprocess::Result<()> {
    let mut address = "127.0.0.1:50000".to_string();
    let mut authkey = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--address" => address = args.next().expect("--address HOST:PORT"),
            "--authkey" => authkey = Some(AuthKey::from(args.next().expect("--authkey KEY"))),
            other => {
                eprintln!(
                    "usage: manager_server [--address HOST:PORT] [--authkey KEY] (got {other:?})"
                );
                std::process::exit(2);
            }
        }
    }
    let server = Server::sync_manager(address.as_str(), authkey)?;
    println!("serving on {}", server.address());
    std::io::stdout().flush()?;
    server.serve_forever()?;
    println!("shut down");
    Ok(())
}
