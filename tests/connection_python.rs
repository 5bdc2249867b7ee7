//! Wire compatibility with CPython's own `multiprocessing.connection`, plus `pipe()`
//! behaviour. Every wait is bounded; nothing sleeps to synchronise.

mod common;

use common::py::{bounded, Py, LIMIT};

use multiprocess::connection::{wait, Address, AuthKey, Client, Listener};
use multiprocess::reduction::pickle::{ByteBuf, HashableValue, Value};
use multiprocess::{pipe, pipe_simplex, Connection, Error};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn port_of(l: &Listener) -> String {
    match l.address() {
        Address::Inet { port, .. } => port.to_string(),
        other => panic!("{other:?}"),
    }
}

const PY_CLIENT: &str = r#"
import sys
from multiprocessing.connection import Client
from multiprocessing import AuthenticationError
port, key = int(sys.argv[1]), sys.argv[2].encode()
try:
    c = Client(('127.0.0.1', port), authkey=key)
except AuthenticationError as e:
    print('EXC', type(e).__name__, e, flush=True)
    sys.exit(0)
c.send_bytes(b'hello')
c.send(['obj', 1, 2.5, None, True, (1, 2), {'k': b'v'}])
print('GOT', repr(c.recv()), flush=True)
print('BYTES', repr(c.recv_bytes()), flush=True)
big = c.recv_bytes()
print('BIG', len(big), big[:3] == b'\x00\x01\x02', big[-1], flush=True)
c.send_bytes(bytes(range(256)) * (64 * 4096))
print('DONE', flush=True)
"#;

#[test]
fn python_client_to_rust_listener() {
    let l = Listener::bind("127.0.0.1:0", Some(AuthKey::from("secret"))).unwrap();
    let py = Py::run(PY_CLIENT, &[&port_of(&l), "secret"]);
    let c = bounded(move || l.accept()).unwrap();
    assert_eq!(c.recv_bytes().unwrap(), b"hello");
    let v = c.recv_pickle_value().unwrap();
    let expected = Value::List(vec![
        Value::String("obj".into()),
        Value::I64(1),
        Value::F64(2.5),
        Value::None,
        Value::Bool(true),
        Value::Tuple(vec![Value::I64(1), Value::I64(2)]),
        Value::Dict(
            [(
                HashableValue::String("k".into()),
                Value::Bytes(b"v".to_vec()),
            )]
            .into_iter()
            .collect(),
        ),
    ]);
    assert_eq!(v, expected);
    c.send_pickle(&(
        "ok",
        true,
        1u64 << 40,
        0.5,
        "café",
        ByteBuf::from(vec![0u8, 255]),
        (1, None::<i32>),
        vec![false],
    ))
    .unwrap();
    assert_eq!(
        py.expect("GOT"),
        r"('ok', True, 1099511627776, 0.5, 'café', b'\x00\xff', (1, None), [False])"
    );
    c.send_bytes(b"bye").unwrap();
    assert_eq!(py.expect("BYTES"), "b'bye'");
    // 64 MiB each way.
    let big: Vec<u8> = (0..64usize << 20).map(|i| i as u8).collect();
    c.send_bytes(&big).unwrap();
    assert_eq!(py.expect("BIG"), "67108864 True 255");
    let back = bounded(move || c.recv_bytes()).unwrap();
    assert_eq!(back.len(), 64 << 20);
    assert!(back.iter().enumerate().all(|(i, &b)| b == i as u8));
    assert_eq!(py.line(), "DONE");
    py.finish();
}

#[test]
fn python_client_with_wrong_key_is_rejected_and_listener_survives() {
    let l = Listener::bind("127.0.0.1:0", Some(AuthKey::from("secret"))).unwrap();
    let port = port_of(&l);
    let py = Py::run(PY_CLIENT, &[&port, "wrong"]);
    // The failed peer is closed by the listener; `accept` never returns it.
    assert_eq!(
        py.line(),
        "EXC AuthenticationError digest sent was rejected"
    );
    py.finish();
    // Still usable: a Rust client with the right key gets in.
    let t = std::thread::spawn(move || {
        Client::new(format!("127.0.0.1:{port}"))
            .authkey("secret")
            .connect()
            .unwrap()
            .send_bytes(b"after")
            .unwrap()
    });
    let c = bounded(move || l.accept()).unwrap();
    assert_eq!(c.recv_bytes().unwrap(), b"after");
    t.join().unwrap();
}

const PY_LISTENER: &str = r#"
import sys, hashlib
from multiprocessing.connection import Listener
from multiprocessing import AuthenticationError
key = sys.argv[1].encode()
with Listener(('127.0.0.1', 0), authkey=key) as l:
    print('READY', l.address[1], flush=True)
    try:
        c = l.accept()
    except AuthenticationError as e:
        print('EXC', type(e).__name__, e, flush=True)
        sys.exit(0)
    m = c.recv_bytes()
    c.send_bytes(m[::-1])
    obj = c.recv()
    print('OBJ', repr(obj), flush=True)
    c.send(('echo', obj, {'n': 2**40, 's': 'café', 'b': b'\x00\xff', 't': (1, None), 'l': [False]}))
    big = c.recv_bytes()
    c.send_bytes(hashlib.sha256(big).digest())
    c.send_bytes(big)
    print('DONE', flush=True)
"#;

#[test]
fn rust_client_to_python_listener() {
    let py = Py::run(PY_LISTENER, &["secret"]);
    let port = py.expect("READY");
    let c = Client::new(format!("127.0.0.1:{port}"))
        .authkey("secret")
        .connect()
        .unwrap();
    c.send_bytes(b"abc").unwrap();
    assert_eq!(c.recv_bytes().unwrap(), b"cba");
    c.send_pickle(&(1, "two", vec![3.0], ByteBuf::from(b"four".to_vec())))
        .unwrap();
    assert_eq!(py.expect("OBJ"), "(1, 'two', [3.0], b'four')");

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Extra {
        n: i64,
        s: String,
        b: ByteBuf,
        t: (i64, Option<i64>),
        l: Vec<bool>,
    }
    type Reply = (String, (i64, String, Vec<f64>, ByteBuf), Extra);
    let (tag, obj, extra): Reply = c.recv_pickle().unwrap();
    assert_eq!(tag, "echo");
    assert_eq!(
        obj,
        (1, "two".into(), vec![3.0], ByteBuf::from(b"four".to_vec()))
    );
    assert_eq!(
        extra,
        Extra {
            n: 1 << 40,
            s: "café".into(),
            b: ByteBuf::from(vec![0, 255]),
            t: (1, None),
            l: vec![false]
        }
    );

    let big: Vec<u8> = (0..64usize << 20).map(|i| (i % 251) as u8).collect();
    c.send_bytes(&big).unwrap();
    let digest = bounded({
        let c = c;
        move || (c.recv_bytes(), c)
    });
    let (digest, c) = (digest.0.unwrap(), digest.1);
    assert_eq!(digest.len(), 32);
    let back = bounded(move || c.recv_bytes()).unwrap();
    assert!(back == big, "64 MiB came back intact");
    assert_eq!(py.line(), "DONE");
    py.finish();
}

#[test]
fn rust_client_with_wrong_key_is_rejected_by_python() {
    let py = Py::run(PY_LISTENER, &["secret"]);
    let port = py.expect("READY");
    let e = Client::new(format!("127.0.0.1:{port}"))
        .authkey("wrong")
        .connect()
        .unwrap_err();
    assert!(
        matches!(&e, Error::Authentication(m) if m == "digest sent was rejected"),
        "{e}"
    );
    assert_eq!(
        py.line(),
        "EXC AuthenticationError digest received was wrong"
    );
    py.finish();
}

const PY_RAW: &str = r#"
import sys, struct
from multiprocessing.connection import Client
c = Client(('127.0.0.1', int(sys.argv[1])), authkey=b'k')
mode = sys.argv[2]
if mode == 'huge':
    # Announce 1 TiB (long form) and send nothing more.
    c._send(struct.pack('!i', -1) + struct.pack('!Q', 1 << 40))
    print('SENT', flush=True)
    c.recv_bytes()  # wait until the Rust side closes
elif mode == 'truncated':
    c._send(struct.pack('!i', 1000) + b'x' * 10)
    print('SENT', flush=True)
    c.close()
"#;

fn raw_peer(mode: &'static str) -> (Connection, Py) {
    let l = Listener::bind("127.0.0.1:0", Some(AuthKey::from("k"))).unwrap();
    let py = Py::run(PY_RAW, &[&port_of(&l), mode]);
    let c = bounded(move || l.accept()).unwrap();
    assert_eq!(py.line(), "SENT");
    (c, py)
}

#[test]
fn oversized_message_is_refused_before_allocation() {
    let (c, py) = raw_peer("huge");
    // 1 TiB announced: refused at once by the default limit (no payload ever arrives,
    // so anything but an immediate refusal would hang or abort on allocation).
    let e = bounded(move || {
        let e = c.recv_bytes().unwrap_err();
        // The stream is out of sync now: later reads keep failing, they never hang.
        assert!(matches!(c.recv_bytes(), Err(Error::Protocol(_))));
        e
    });
    assert!(
        matches!(&e, Error::Protocol(m) if m.contains("bad message length")),
        "{e}"
    );
    drop(py);
}

#[test]
fn truncated_frame_is_an_error() {
    let (c, py) = raw_peer("truncated");
    let e = bounded(move || c.recv_bytes().unwrap_err());
    assert!(
        matches!(&e, Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof),
        "{e}"
    );
    py.finish();
}

#[test]
fn rust_listener_and_client_over_unix_paths_and_abstract_names() {
    let path = std::env::temp_dir().join(format!("mp-conn-test-{}.sock", std::process::id()));
    for addr in [
        Address::Unix(path.clone()),
        Address::Abstract(format!("mp-conn-test-{}", std::process::id()).into_bytes()),
    ] {
        let l = Listener::bind(&addr, Some(AuthKey::new(Vec::new()))).unwrap();
        let a = l.address().clone();
        let t = std::thread::spawn(move || {
            let c = Client::new(a).authkey(Vec::new()).connect().unwrap();
            c.send_pickle(&"over unix").unwrap();
            c.recv_bytes().unwrap()
        });
        let c = bounded(move || l.accept()).unwrap();
        assert_eq!(c.recv_pickle::<String>().unwrap(), "over unix");
        c.send_bytes(b"ack").unwrap();
        assert_eq!(t.join().unwrap(), b"ack");
    }
    assert!(!path.exists());
}

// ---- pipe() ----

#[test]
fn buffer_too_short_keeps_the_stream_usable() {
    let (a, b) = pipe().unwrap();
    a.send_bytes(b"0123456789").unwrap();
    a.send_bytes(b"next").unwrap();
    let mut buf = [0u8; 4];
    match b.recv_bytes_into(&mut buf) {
        Err(Error::BufferTooShort(m)) => assert_eq!(m, b"0123456789"),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.recv_bytes_into(&mut buf).unwrap(), 4);
    assert_eq!(&buf, b"next");
    // A large message lands straight in a big enough buffer, from another thread.
    let big: Vec<u8> = (0..3usize << 20).map(|i| (i % 253) as u8).collect();
    let sender = std::thread::spawn({
        let big = big.clone();
        move || a.send_bytes(&big).map(|()| a)
    });
    let mut dst = vec![0u8; 4 << 20];
    assert_eq!(b.recv_bytes_into(&mut dst).unwrap(), big.len());
    assert!(dst[..big.len()] == big[..]);
    drop(sender.join().unwrap().unwrap());
    assert!(matches!(b.recv_bytes_into(&mut dst), Err(Error::Eof)));
}

#[test]
fn poll_and_wait_see_messages_and_buffered_data() {
    let (a, b) = pipe().unwrap();
    assert!(!b.poll(Some(Duration::ZERO)).unwrap());
    a.send_bytes(b"one").unwrap();
    a.send_bytes(b"two").unwrap();
    assert!(b.poll(Some(LIMIT)).unwrap());
    assert_eq!(b.recv_bytes().unwrap(), b"one");
    // "two" may now sit in b's read-ahead buffer, with the socket empty: still ready.
    assert!(b.poll(Some(Duration::ZERO)).unwrap());
    let (c, d) = pipe().unwrap();
    assert_eq!(wait(&[&d, &b], Some(Duration::ZERO)).unwrap(), vec![1]);
    assert_eq!(b.recv_bytes().unwrap(), b"two");
    assert!(wait(&[&d, &b], Some(Duration::from_millis(10)))
        .unwrap()
        .is_empty());
    drop(c);
    assert_eq!(wait(&[&d, &b], Some(LIMIT)).unwrap(), vec![0]);
    assert!(matches!(d.recv_bytes(), Err(Error::Eof)));
}

#[test]
fn simplex_directions_are_enforced() {
    let (rx, tx) = pipe_simplex().unwrap();
    assert!(!rx.writable() && rx.readable());
    assert!(tx.writable() && !tx.readable());
    assert!(rx.send_bytes(b"x").is_err());
    assert!(tx.recv_bytes().is_err());
    assert!(tx.poll(Some(Duration::ZERO)).is_err());
    tx.send_bytes(b"ok").unwrap();
    assert_eq!(rx.recv_bytes().unwrap(), b"ok");
}

fn echo_once(c: Connection) -> String {
    let s: String = c.recv().unwrap();
    c.send(&format!("child got {s}")).unwrap();
    s
}

#[test]
fn a_connection_sent_through_a_connection_arrives_usable() {
    let (a, b) = pipe().unwrap();
    let (mine, theirs) = pipe().unwrap();
    a.send(&theirs).unwrap();
    drop(theirs);
    let arrived: Connection = b.recv().unwrap();
    mine.send_bytes(b"through").unwrap();
    assert_eq!(arrived.recv_bytes().unwrap(), b"through");

    // And into another process, in its args.
    let (mine, theirs) = pipe().unwrap();
    let h = multiprocess::spawn(echo_once, theirs).unwrap();
    mine.send(&"hi".to_string()).unwrap();
    assert_eq!(mine.recv::<String>().unwrap(), "child got hi");
    assert_eq!(h.join().unwrap(), "hi");
}

// ---- the echo_server example, driven by a Python client ----

#[test]
fn echo_server_example_serves_a_python_client() {
    let exe = std::env::current_exe().unwrap();
    let server = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join("examples").join("echo_server"))
        .unwrap();
    assert!(
        server.exists(),
        "{} is built by cargo test",
        server.display()
    );
    let mut child = Command::new(&server)
        .args(["--address", "127.0.0.1:0", "--authkey", "pw", "--once"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let first = bounded(move || {
        let mut l = String::new();
        BufReader::new(out).read_line(&mut l).unwrap();
        l
    });
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{first:?}"))
        .to_string();
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    let py = Py::run(
        r#"
import sys
from multiprocessing.connection import Client
c = Client(('127.0.0.1', int(sys.argv[1])), authkey=b'pw')
c.send_bytes(b'raw bytes')
print('B', repr(c.recv_bytes()), flush=True)
c.send({'k': [1, 2.5, None, True, b'x', 'é'], 't': (1, 2)})
print('O', repr(c.recv()), flush=True)
c.close()
"#,
        &[&port],
    );
    assert_eq!(py.expect("B"), "b'raw bytes'");
    assert_eq!(
        py.expect("O"),
        "{'k': [1, 2.5, None, True, b'x', 'é'], 't': (1, 2)}"
    );
    py.finish();
    let st = bounded(move || child.wait().unwrap());
    assert!(st.success(), "echo_server exited with {st}");
}

#[test]
fn empty_authkey_still_runs_the_handshake_with_python() {
    // CPython's Client runs the handshake for authkey=b'' (a key that is empty, not
    // absent); so do we, so the two agree.
    let l = Listener::bind("127.0.0.1:0", Some(AuthKey::new(Vec::new()))).unwrap();
    let py = Py::run(
        r#"
import sys
from multiprocessing.connection import Client
c = Client(('127.0.0.1', int(sys.argv[1])), authkey=b'')
c.send(('empty', b''))
print('OK', c.recv_bytes().decode(), flush=True)
"#,
        &[&port_of(&l)],
    );
    let c = bounded(move || l.accept()).unwrap();
    let (s, b): (String, ByteBuf) = c.recv_pickle().unwrap();
    assert_eq!((s.as_str(), b.len()), ("empty", 0));
    c.send_bytes(b"authenticated").unwrap();
    assert_eq!(py.expect("OK"), "authenticated");
    py.finish();
}
