//! An echo server that CPython's `multiprocessing.connection.Client` can talk to.
//!
//! ```text
//! cargo run --example echo_server -- --address 127.0.0.1:6000 --authkey secret
//! python3 -c "from multiprocessing.connection import Client
//! c = Client(('127.0.0.1', 6000), authkey=b'secret')
//! c.send({'hello': [1, 2.5, None]}); print(c.recv())
//! c.send_bytes(b'raw'); print(c.recv_bytes())"
//! ```
//!
//! Every message is sent back: a pickled object is decoded and re-pickled (so it comes
//! back as an object), anything else is returned as the same bytes. Prints
//! `listening on HOST:PORT` once bound. Each connection is served on its own thread
//! until the peer closes; `--once` exits after the first one.

use multiprocess::connection::{AuthKey, Listener};
use multiprocess::reduction::pickle;
use multiprocess::{Connection, Error};
use std::io::Write;

fn serve(conn: Connection) -> multiprocess::Result<()> {
    loop {
        let msg = match conn.recv_bytes() {
            Ok(m) => m,
            Err(Error::Eof) => return Ok(()),
            Err(e) => return Err(e),
        };
        let value = (msg.first() == Some(&0x80))
            .then(|| pickle::value_from_slice(&msg).ok())
            .flatten();
        match value {
            Some(v) => conn.send_bytes(&pickle::value_to_vec(&v)?)?,
            None => conn.send_bytes(&msg)?,
        }
    }
}

fn main() -> multiprocess::Result<()> {
    let mut address = "127.0.0.1:0".to_string();
    let mut authkey = None;
    let mut once = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--address" => address = args.next().expect("--address HOST:PORT"),
            "--authkey" => authkey = Some(AuthKey::from(args.next().expect("--authkey KEY"))),
            "--once" => once = true,
            other => {
                eprintln!("usage: echo_server [--address HOST:PORT] [--authkey KEY] [--once] (got {other:?})");
                std::process::exit(2);
            }
        }
    }
    let listener = Listener::bind(address.as_str(), authkey)?;
    println!("listening on {}", listener.address());
    std::io::stdout().flush()?;
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("echo_server: refused a peer: {e}");
                continue;
            }
        };
        if once {
            return serve(conn);
        }
        std::thread::spawn(move || {
            if let Err(e) = serve(conn) {
                eprintln!("echo_server: {e}");
            }
        });
    }
}
