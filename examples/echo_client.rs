//! Talks to `echo_server` (or any echoing CPython `Listener`): sends bytes and a pickled
//! object and prints what came back.
//!
//! ```text
//! cargo run --example echo_client -- --address 127.0.0.1:6000 --authkey secret
//! ```

use multiprocess::connection::Client;
use multiprocess::reduction::pickle::{ByteBuf, Value};

fn main() -> multiprocess::Result<()> {
    let mut address = "127.0.0.1:6000".to_string();
    let mut authkey = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--address" => address = args.next().expect("--address HOST:PORT"),
            "--authkey" => authkey = Some(args.next().expect("--authkey KEY")),
            other => {
                eprintln!(
                    "usage: echo_client [--address HOST:PORT] [--authkey KEY] (got {other:?})"
                );
                std::process::exit(2);
            }
        }
    }
    let mut client = Client::new(address.as_str());
    if let Some(k) = authkey {
        client = client.authkey(k);
    }
    let conn = client.connect()?;

    conn.send_bytes(b"hello, echo")?;
    println!("bytes:  {:?}", String::from_utf8_lossy(&conn.recv_bytes()?));

    conn.send_pickle(&(
        "obj",
        1,
        2.5,
        None::<()>,
        true,
        ByteBuf::from(b"raw".to_vec()),
    ))?;
    let back: Value = conn.recv_pickle_value()?;
    println!("object: {back}");
    Ok(())
}
