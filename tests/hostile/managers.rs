//! Hostile manager requests, sent as raw pickles over an authenticated connection to a
//! real manager server (a `Manager` started in its own process, as
//! `examples/manager_server` runs one): deep nesting, memo bombs, huge integers, huge
//! results, adopting references the client never held. After each, the server process
//! is alive and serves a CPython client and a Rust client, each within a second.

use crate::common::py::{bounded, Py};
use crate::common::{wait_until, LONG};
use multiprocess::connection::{Address, Client, Connection};
use multiprocess::managers::wire::{self, Reply};
use multiprocess::managers::Manager;
use multiprocess::reduction::pickle::Value;
use std::time::{Duration, Instant};

const KEY: &str = "hostile-key";

/// A CPython `SyncManager` client: connects, uses a dict, and reports how long that took
/// (interpreter start-up excluded).
const PY_CLIENT: &str = r#"
import sys, time
from multiprocessing.managers import SyncManager
t = time.monotonic()
m = SyncManager(address=(sys.argv[1], int(sys.argv[2])), authkey=sys.argv[3].encode())
m.connect()
d = m.dict()
d['k'] = 41
assert d['k'] + 1 == 42
print('OK', time.monotonic() - t, flush=True)
"#;

struct Target {
    manager: Manager,
    port: u16,
}

impl Target {
    fn start() -> Target {
        let manager = Manager::builder()
            .address("127.0.0.1:0")
            .authkey(KEY)
            .start()
            .unwrap();
        let port = match manager.address() {
            Address::Inet { port, .. } => port,
            other => panic!("{other:?}"),
        };
        Target { manager, port }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn connect(&self) -> Connection {
        Client::new(&*self.addr()).authkey(KEY).connect().unwrap()
    }

    /// A method-call channel (`accept_connection` done).
    fn channel(&self) -> Connection {
        let c = self.connect();
        c.send_bytes(&wire::encode_request(
            None,
            "accept_connection",
            &[Value::String("attacker".into())],
            &[],
        ))
        .unwrap();
        assert_eq!(reply(&c), Reply::Return(Value::None));
        c
    }

    /// The server survived, and serves a CPython and a Rust client within a second each.
    fn assert_serving(&self) {
        let p = self.manager.process().unwrap();
        assert!(p.is_alive(), "the manager server process died");
        let port = self.port.to_string();
        let py = Py::run(PY_CLIENT, &["127.0.0.1", &port, KEY]);
        let took: f64 = py.expect("OK").parse().unwrap();
        assert!(took < 1.0, "CPython client served in {took} s");
        let addr = self.addr();
        let took = bounded(move || {
            let t = Instant::now();
            let m = Manager::connect(&*addr, KEY).unwrap();
            let d = m.dict::<String, i64>().unwrap();
            d.insert(&"k".to_string(), &1).unwrap();
            assert_eq!(d.get(&"k".to_string()).unwrap(), Some(1));
            t.elapsed()
        });
        assert!(
            took < Duration::from_secs(1),
            "Rust client served in {took:?}"
        );
        assert!(p.is_alive(), "the manager server process died");
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.manager.shutdown();
    }
}

fn reply(c: &Connection) -> Reply {
    assert!(
        c.poll(Some(crate::common::py::LIMIT)).unwrap(),
        "the server answered in time"
    );
    wire::decode_reply(&c.recv_bytes().unwrap()).unwrap()
}

fn is_remote_error(r: &Reply, needle: &str) -> bool {
    matches!(r, Reply::Traceback(t) if t.contains(needle))
}

/// Pickle opcodes for a raw request `(ident, method, (args…), {})`.
fn request(ident: Option<&str>, method: &str, args: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 4, b'('];
    let s = |p: &mut Vec<u8>, text: &str| {
        p.push(b'X');
        p.extend_from_slice(&(text.len() as u32).to_le_bytes());
        p.extend_from_slice(text.as_bytes());
    };
    match ident {
        Some(i) => s(&mut p, i),
        None => p.push(b'N'),
    }
    s(&mut p, method);
    p.push(b'(');
    p.extend_from_slice(args);
    p.extend_from_slice(b"t}t.");
    p
}

/// `depth` lists nested in each other, as opcodes: `] ] … ] a a … a`.
fn nested_lists(depth: usize) -> Vec<u8> {
    let mut p = vec![b']'; depth];
    p.extend(std::iter::repeat_n(b'a', depth - 1));
    p
}

fn new_list(t: &Target) -> String {
    let c = t.connect();
    c.send_bytes(&wire::encode_request(
        None,
        "create",
        &[Value::String("list".into())],
        &[],
    ))
    .unwrap();
    match reply(&c) {
        Reply::Return(Value::Tuple(v)) => match &v[0] {
            Value::String(id) => id.clone(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn deep_nesting_is_refused_and_nesting_within_the_limit_works_everywhere() {
    let t = Target::start();
    let list = new_list(&t);
    let c = t.channel();
    // 100 000 nested lists (200 KB): a method call and a control request.
    let deep = request(Some(&list), "append", &nested_lists(100_000));
    assert!(deep.len() < 210_000);
    c.send_bytes(&deep).unwrap();
    assert!(is_remote_error(&reply(&c), "nested deeper"));
    let control = t.connect();
    control
        .send_bytes(&request(None, "create", &nested_lists(100_000)))
        .unwrap();
    assert!(is_remote_error(&reply(&control), "nested deeper"));
    // The same depth through a memo reference (general decoder path).
    let mut memo = nested_lists(100_000);
    memo.extend_from_slice(&[0x94, b'0', b'h', 0]);
    c.send_bytes(&request(Some(&list), "append", &memo))
        .unwrap();
    assert!(is_remote_error(&reply(&c), "nested deeper"));
    t.assert_serving();

    // Just within the limit (the request's tuple and its args tuple are two levels):
    // stored, copied, compared, printed and sent back.
    let ok = wire::MAX_DEPTH as usize - 2;
    c.send_bytes(&request(Some(&list), "append", &nested_lists(ok)))
        .unwrap();
    assert_eq!(reply(&c), Reply::Return(Value::None));
    for method in ["#GETVALUE", "__repr__", "__reversed__"] {
        c.send_bytes(&wire::encode_request(Some(&list), method, &[], &[]))
            .unwrap();
        assert!(matches!(reply(&c), Reply::Return(_)), "{method}");
    }
    c.send_bytes(&request(Some(&list), "count", &nested_lists(ok)))
        .unwrap();
    assert_eq!(reply(&c), Reply::Return(Value::I64(1)));
    t.assert_serving();
}

#[test]
fn memo_bombs_are_refused() {
    let t = Target::start();
    let list = new_list(&t);
    let c = t.channel();
    // Aliasing: L(i) = [] memoized, then L(i-1) appended twice through the memo, so
    // each list's size at memoization (1) says nothing of its final size (2^i).
    let mut p = vec![b']', b'r', 0, 0, 0, 0];
    for i in 1..64u32 {
        p.extend_from_slice(b"]r");
        p.extend_from_slice(&i.to_le_bytes());
        p.extend_from_slice(b"(j");
        p.extend_from_slice(&(i - 1).to_le_bytes());
        p.push(b'j');
        p.extend_from_slice(&(i - 1).to_le_bytes());
        p.push(b'e');
    }
    let started = Instant::now();
    c.send_bytes(&request(Some(&list), "append", &p)).unwrap();
    assert!(is_remote_error(&reply(&c), "expand"));
    // Growth after aliasing: a list memoized, referenced 200 000 times, then grown to
    // 200 000 items through one more reference (4 × 10^10 items once resolved).
    let mut p = vec![b']', b'q', 0, b']', b'('];
    for _ in 0..200_000 {
        p.extend_from_slice(&[b'h', 0]);
    }
    p.extend_from_slice(&[b'e', b'h', 0, b'(']);
    for _ in 0..200_000 {
        p.extend_from_slice(&[b'K', 1]);
    }
    p.extend_from_slice(b"e0");
    c.send_bytes(&request(Some(&list), "append", &p)).unwrap();
    assert!(is_remote_error(
        &reply(&c),
        "changed after a memo reference"
    ));
    // Tuples of tuples (the classic form), and one big string referenced many times.
    let mut p = vec![b']', 0x94];
    for i in 0..64u32 {
        p.push(b'j');
        p.extend_from_slice(&i.to_le_bytes());
        p.push(b'j');
        p.extend_from_slice(&i.to_le_bytes());
        p.extend_from_slice(&[0x86, 0x94]);
    }
    c.send_bytes(&request(Some(&list), "append", &p)).unwrap();
    assert!(is_remote_error(&reply(&c), "expand"));
    let mut p = vec![b'X'];
    p.extend_from_slice(&(500_000u32).to_le_bytes());
    p.extend(std::iter::repeat_n(b'x', 500_000));
    p.extend_from_slice(&[0x94, b'(']);
    for _ in 0..250_000 {
        p.extend_from_slice(&[b'h', 0]);
    }
    p.push(b'l');
    c.send_bytes(&request(Some(&list), "append", &p)).unwrap();
    assert!(is_remote_error(&reply(&c), "expand"));
    assert!(started.elapsed() < Duration::from_secs(10));
    t.assert_serving();
}

#[test]
fn huge_integers_are_refused_or_kept_out_of_decimal() {
    let t = Target::start();
    let list = new_list(&t);
    let c = t.channel();
    // A million-digit text integer (protocol 0's LONG): CPython's 4300-digit limit.
    let mut p = vec![b'L'];
    p.extend(std::iter::repeat_n(b'7', 1_000_000));
    p.extend_from_slice(b"L\n");
    let started = Instant::now();
    c.send_bytes(&request(Some(&list), "append", &p)).unwrap();
    assert!(is_remote_error(&reply(&c), "4300 digits"));
    let mut p = vec![b'I'];
    p.extend(std::iter::repeat_n(b'7', 1_000_000));
    p.push(b'\n');
    c.send_bytes(&request(Some(&list), "append", &p)).unwrap();
    assert!(is_remote_error(&reply(&c), "4300 digits"));
    // A binary 1 MB integer (LONG4, linear to read) is kept, but never printed in decimal.
    let mut p = vec![0x8b];
    p.extend_from_slice(&(1_000_000u32).to_le_bytes());
    p.extend(std::iter::repeat_n(0x5a, 1_000_000));
    c.send_bytes(&request(Some(&list), "append", &p)).unwrap();
    assert_eq!(reply(&c), Reply::Return(Value::None));
    c.send_bytes(&wire::encode_request(Some(&list), "__repr__", &[], &[]))
        .unwrap();
    assert!(
        matches!(reply(&c), Reply::Return(Value::String(s)) if s.contains("more than 4300 digits"))
    );
    c.send_bytes(&wire::encode_request(
        Some(&list),
        "index",
        &[Value::String("absent".into())],
        &[],
    ))
    .unwrap();
    assert!(matches!(reply(&c), Reply::Error { name, .. } if name == "ValueError"));
    assert!(started.elapsed() < Duration::from_secs(10));
    t.assert_serving();
}

#[test]
fn results_are_bounded_by_bytes() {
    let t = Target::start();
    let list = new_list(&t);
    let c = t.channel();
    // One 1 MB string, then `* 10_000` (10 GB) and `*= 10_000`.
    c.send_bytes(&wire::encode_request(
        Some(&list),
        "append",
        &[Value::String("x".repeat(1 << 20))],
        &[],
    ))
    .unwrap();
    assert_eq!(reply(&c), Reply::Return(Value::None));
    for method in ["__mul__", "__rmul__", "__imul__"] {
        c.send_bytes(&wire::encode_request(
            Some(&list),
            method,
            &[Value::I64(10_000)],
            &[],
        ))
        .unwrap();
        assert!(
            matches!(reply(&c), Reply::Error { name, .. } if name == "MemoryError"),
            "{method}"
        );
    }
    // A 32 MB string made into one item per character (≈ 1.2 GB).
    c.send_bytes(&wire::encode_request(
        Some(&list),
        "extend",
        &[Value::String("y".repeat(32 << 20))],
        &[],
    ))
    .unwrap();
    assert!(matches!(reply(&c), Reply::Error { name, .. } if name == "MemoryError"));
    c.send_bytes(&wire::encode_request(Some(&list), "__len__", &[], &[]))
        .unwrap();
    assert_eq!(reply(&c), Reply::Return(Value::I64(1)));
    // Small products still work.
    c.send_bytes(&wire::encode_request(
        Some(&list),
        "__mul__",
        &[Value::I64(3)],
        &[],
    ))
    .unwrap();
    assert!(matches!(reply(&c), Reply::Return(Value::List(l)) if l.len() == 3));
    t.assert_serving();
}

#[test]
fn adopting_or_releasing_references_never_held_is_refused() {
    let t = Target::start();
    // A victim's dict, its reference owned by its proxy's channel.
    let victim = Manager::connect(&*t.addr(), KEY).unwrap();
    let d = victim.dict::<String, i64>().unwrap();
    d.insert(&"a".to_string(), &1).unwrap();
    let id = d.proxy().ident().to_string();
    // The attacker adopts it (twice) on its own channel and hangs up, and sends decref.
    let c = t.channel();
    for _ in 0..2 {
        c.send_bytes(&wire::encode_request(Some(&id), "#ADOPT", &[], &[]))
            .unwrap();
        assert!(is_remote_error(&reply(&c), "no reference to adopt"));
    }
    drop(c);
    let control = t.connect();
    control
        .send_bytes(&wire::encode_request(
            None,
            "decref",
            &[Value::String(id.clone())],
            &[],
        ))
        .unwrap();
    assert!(matches!(reply(&control), Reply::Traceback(_)));
    // An attacker that takes a reference of its own may adopt exactly that one.
    let control = t.connect();
    control
        .send_bytes(&wire::encode_request(
            None,
            "incref",
            &[Value::String(id.clone())],
            &[],
        ))
        .unwrap();
    assert_eq!(reply(&control), Reply::Return(Value::None));
    let c = t.channel();
    c.send_bytes(&wire::encode_request(Some(&id), "#ADOPT", &[], &[]))
        .unwrap();
    assert_eq!(reply(&c), Reply::Return(Value::None));
    c.send_bytes(&wire::encode_request(Some(&id), "#ADOPT", &[], &[]))
        .unwrap();
    assert!(is_remote_error(&reply(&c), "no reference to adopt"));
    drop(c);
    // Once the server has released what the attacker's channel owned, the victim's
    // object is still there, with its value.
    let refcount = || {
        let control = t.connect();
        control
            .send_bytes(&wire::encode_request(None, "debug_info", &[], &[]))
            .unwrap();
        match reply(&control) {
            Reply::Return(Value::String(s)) => s
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{id}:")))
                .map(|l| l.rsplit('=').next().unwrap().trim().to_string()),
            other => panic!("{other:?}"),
        }
    };
    assert!(wait_until(LONG, || refcount().as_deref() == Some("1")));
    assert_eq!(d.get(&"a".to_string()).unwrap(), Some(1));
    t.assert_serving();
}
