//! Managers: the Rust server with CPython clients, Rust proxies with a CPython server,
//! proxies travelling to child processes, failures (dead server, dead client, wrong
//! keys, hostile requests) and a load test. Every wait is bounded; nothing sleeps to
//! synchronise.

mod common;

use common::py::{bounded, Py, LIMIT};

use multiprocess::connection::{Address, AuthKey, Client};
use multiprocess::managers::wire::{self, Reply};
use multiprocess::managers::{DictProxy, Manager, QueueProxy, Server};
use multiprocess::reduction::pickle::Value;
use multiprocess::{Error, Process, StartMethod};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PY_CLIENT: &str = include_str!("py/manager_client.py");
const PY_SERVER: &str = include_str!("py/manager_server.py");

/// A Rust SyncManager server on a thread of this process, on a free loopback port.
fn rust_server(
    key: &str,
) -> (
    u16,
    multiprocess::managers::StopHandle,
    std::thread::JoinHandle<()>,
) {
    let server = Server::sync_manager("127.0.0.1:0", Some(AuthKey::from(key))).unwrap();
    let port = match server.address() {
        Address::Inet { port, .. } => *port,
        other => panic!("{other:?}"),
    };
    let stop = server.stop_handle();
    let t = std::thread::spawn(move || server.serve_forever().unwrap());
    (port, stop, t)
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------ CPython client, Rust server

#[test]
fn cpython_syncmanager_client_uses_rust_server() {
    let (port, stop, t) = rust_server("sekrit");
    let mut py = Py::run(PY_CLIENT, &["127.0.0.1", &port.to_string(), "sekrit"]);
    assert_eq!(py.line(), "OK");
    assert!(py.wait_exit().success());
    // The CPython proxies were all released (decref at exit): nothing left.
    let m = Manager::connect(format!("127.0.0.1:{port}"), "sekrit").unwrap();
    eventually("python's objects to be released", || {
        m.number_of_objects().unwrap() == 0
    });
    stop.stop();
    bounded(move || t.join().unwrap());
}

#[test]
fn cpython_basemanager_register_style_client() {
    use multiprocess::managers::objects::{Dict, Queue};
    use std::sync::Arc;
    let server = Server::builder("127.0.0.1:0")
        .authkey("k2")
        .register("get_dict", |_, _| Ok(Arc::new(Dict::default())))
        .register("get_queue", |_, _| Ok(Arc::new(Queue::new(0))))
        .bind()
        .unwrap();
    let port = match server.address() {
        Address::Inet { port, .. } => *port,
        _ => unreachable!(),
    };
    let t = std::thread::spawn(move || server.serve_forever().unwrap());
    let script = r#"
import sys
from multiprocessing.managers import BaseManager, DictProxy
class M(BaseManager): pass
M.register('get_dict', proxytype=DictProxy)
M.register('get_queue')
m = M(address=('127.0.0.1', int(sys.argv[1])), authkey=b'k2')
m.connect()
d = m.get_dict()
d['x'] = 41
d['x'] += 1
q = m.get_queue()
q.put(d['x'])
try:
    d['nope']
except KeyError as e:
    print('KEYERROR', e.args[0], flush=True)
print('GOT', q.get(), flush=True)
m.shutdown() if hasattr(m, '_process') and m._process else None
conn = m._Client(m._address, authkey=m._authkey)
from multiprocessing.managers import dispatch
dispatch(conn, None, 'shutdown')
print('SHUTDOWN', flush=True)
"#;
    let py = Py::run(script, &[&port.to_string()]);
    assert_eq!(py.line(), "KEYERROR nope");
    assert_eq!(py.line(), "GOT 42");
    assert_eq!(py.line(), "SHUTDOWN");
    // A client's 'shutdown' stops the Rust server.
    bounded(move || t.join().unwrap());
}

#[test]
fn cpython_client_with_wrong_key_fails_and_server_survives() {
    let (port, stop, t) = rust_server("right");
    let py = Py::run(PY_CLIENT, &["127.0.0.1", &port.to_string(), "wrong"]);
    assert_eq!(py.line(), "AUTHFAIL AuthenticationError");
    // Rust client with a wrong key: Authentication error, and the server still serves.
    let err = Manager::connect(format!("127.0.0.1:{port}"), "wrong").unwrap_err();
    assert!(matches!(err, Error::Authentication(_)), "{err:?}");
    let m = Manager::connect(format!("127.0.0.1:{port}"), "right").unwrap();
    let d = m.dict::<String, i32>().unwrap();
    d.insert(&"k".into(), &1).unwrap();
    assert_eq!(d.get(&"k".into()).unwrap(), Some(1));
    assert_eq!(iterate(d.proxy()), vec!["k"]);
    // The iterator was freed with its proxy: only the dict is left.
    eventually("the iterator to be freed", || {
        m.number_of_objects().unwrap() == 1
    });
    stop.stop();
    bounded(move || t.join().unwrap());
}

// ------------------------------------------------------------ Rust proxies, CPython server

/// Iterates a dict proxy the way CPython's `for k in d` does: `__iter__` returns a new
/// shared Iterator; `__next__` until `StopIteration`.
fn iterate(d: &multiprocess::managers::Proxy) -> Vec<String> {
    use multiprocess::managers::Called;
    let Called::Proxy(it) = d.call_raw("__iter__", &[], &[]).unwrap() else {
        panic!("__iter__ did not return a proxy");
    };
    assert_eq!(it.typeid(), "Iterator");
    let mut keys = Vec::new();
    loop {
        match it.call::<String>("__next__", ()) {
            Ok(k) => keys.push(k),
            Err(Error::Remote { exception, .. }) if exception == "StopIteration" => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    keys.sort();
    keys
}

#[test]
fn rust_proxies_use_cpython_server() {
    let mut py = Py::run(PY_SERVER, &["pykey"]);
    let port = py.line().strip_prefix("PORT ").unwrap().to_string();
    let addr = format!("127.0.0.1:{port}");

    // Wrong key: refused by CPython, typed error here.
    let err = Manager::connect(&*addr, "nope").unwrap_err();
    assert!(matches!(err, Error::Authentication(_)), "{err:?}");

    let m = Manager::connect(&*addr, "pykey").unwrap();
    let d = m.dict::<String, Vec<i64>>().unwrap();
    d.insert(&"a".into(), &vec![1, 2]).unwrap();
    assert_eq!(d.get(&"a".into()).unwrap(), Some(vec![1, 2]));
    assert_eq!(d.get(&"missing".into()).unwrap(), None);
    assert!(d.contains_key(&"a".into()).unwrap());
    assert_eq!(d.len().unwrap(), 1);
    assert_eq!(d.keys().unwrap(), vec!["a".to_string()]);
    assert_eq!(d.items().unwrap(), vec![("a".to_string(), vec![1, 2])]);
    assert_eq!(d.remove(&"a".into()).unwrap(), Some(vec![1, 2]));
    assert_eq!(d.remove(&"a".into()).unwrap(), None);
    // Iteration goes through a '#PROXY' reply and a server-side Iterator object.
    d.insert(&"k1".into(), &vec![]).unwrap();
    d.insert(&"k2".into(), &vec![]).unwrap();
    assert_eq!(iterate(d.proxy()), vec!["k1", "k2"]);

    let l = m.list::<String>().unwrap();
    l.push(&"x".into()).unwrap();
    l.extend(&["y".into(), "z".into()]).unwrap();
    assert_eq!(l.get(1).unwrap(), Some("y".into()));
    assert_eq!(l.get(7).unwrap(), None);
    let err = l.set(7, &"no".into()).unwrap_err();
    assert!(
        matches!(&err, Error::Remote { exception, .. } if exception == "IndexError"),
        "{err:?}"
    );
    assert_eq!(l.to_vec().unwrap(), vec!["x", "y", "z"]);
    assert_eq!(l.pop().unwrap(), Some("z".into()));

    let q = m.queue::<(i32, String)>().unwrap();
    q.put((1, "one".into())).unwrap();
    assert_eq!(q.len().unwrap(), 1);
    assert_eq!(q.get().unwrap(), (1, "one".into()));
    assert!(matches!(q.try_get(), Err(multiprocess::Error::Empty)));
    assert!(matches!(
        q.get_timeout(Duration::from_millis(20)),
        Err(multiprocess::Error::Empty)
    ));

    let v = m.value(&5i64).unwrap();
    v.set(&6).unwrap();
    assert_eq!(v.get().unwrap(), 6);
    let ns = m.namespace().unwrap();
    ns.set("name", "py").unwrap();
    assert_eq!(ns.get::<String>("name").unwrap(), "py");
    assert_eq!(ns.try_get::<String>("other").unwrap(), None);
    let lock = m.lock().unwrap();
    assert!(lock.try_acquire().unwrap());
    assert!(!lock.clone().try_acquire().unwrap());
    lock.release().unwrap();
    let ev = m.event().unwrap();
    ev.set().unwrap();
    assert!(ev.wait_timeout(Duration::from_secs(1)).unwrap());

    // Dropping proxies sends decref: the CPython server ends up empty.
    drop((d, l, q, v, ns, lock, ev));
    assert_eq!(m.number_of_objects().unwrap(), 0);
    m.shutdown().unwrap();
    assert!(py.wait_exit().success());
}

// ------------------------------------------------------------ proxies in Process args

fn child_uses_proxies(d: DictProxy<String, i64>, q: QueueProxy<i64>, n: i64) {
    d.insert(&format!("child-{n}"), &(n * 10)).unwrap();
    q.put(n).unwrap();
}

fn proxies_travel_in_args(m: StartMethod) {
    let manager = Manager::builder().start_method(m).start().unwrap();
    let d = manager.dict::<String, i64>().unwrap();
    let q = manager.queue::<i64>().unwrap();
    let procs: Vec<Process> = (1..=2)
        .map(|n| {
            Process::builder()
                .start_method(m)
                .build(child_uses_proxies, (d.clone(), q.clone(), n))
        })
        .collect();
    for p in &procs {
        p.start().unwrap();
    }
    let mut got = vec![q.get_timeout(LIMIT).unwrap(), q.get_timeout(LIMIT).unwrap()];
    got.sort();
    assert_eq!(got, vec![1, 2]);
    for p in &procs {
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(0));
    }
    let mut items = d.items().unwrap();
    items.sort();
    assert_eq!(items, vec![("child-1".into(), 10), ("child-2".into(), 20)]);
    // The children's references went with them: only d and q remain.
    eventually("children's references to be released", || {
        manager.number_of_objects().unwrap() == 2
    });
    manager.shutdown().unwrap();
}

each_method!(proxies_travel_in_args);

// ------------------------------------------------------------ failures

#[test]
fn server_killed_mid_call_gives_an_error() {
    let manager = Manager::start().unwrap();
    let q = manager.queue::<i32>().unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(q.get());
    });
    // The get is blocked on the server; kill the server.
    let pid = manager.process().unwrap().pid().unwrap();
    manager.process().unwrap().kill().unwrap();
    let res = rx.recv_timeout(LIMIT).expect("the blocked call returned");
    assert!(res.is_err(), "got {res:?} from a dead server (pid {pid})");
    waiter.join().unwrap();
    // New calls fail at once too.
    let err = manager.dict::<i32, i32>().unwrap_err();
    assert!(matches!(err, Error::Io(_) | Error::Eof), "{err:?}");
}

fn blocked_child(
    q: QueueProxy<i32>,
    ready: QueueProxy<i32>,
    d: DictProxy<i32, i32>,
    lock: multiprocess::managers::LockProxy,
) {
    // A reference of its own and a held lock, then block in get until killed.
    let _mine = d.clone();
    lock.acquire().unwrap();
    ready.put(1).unwrap();
    let _ = q.get();
}

#[test]
fn killed_client_releases_its_references_and_never_eats_an_item() {
    let manager = Manager::start().unwrap();
    let q = manager.queue::<i32>().unwrap();
    let ready = manager.queue::<i32>().unwrap();
    let d = manager.dict::<i32, i32>().unwrap();
    let lock = manager.lock().unwrap();
    let child = Process::new(
        blocked_child,
        (q.clone(), ready.clone(), d.clone(), lock.clone()),
    );
    child.start().unwrap();
    assert_eq!(ready.get_timeout(LIMIT).unwrap(), 1);
    let list = manager.list::<i32>().unwrap();
    assert_eq!(manager.number_of_objects().unwrap(), 5);
    assert!(!lock.try_acquire().unwrap(), "the child holds the lock");
    child.kill().unwrap();
    child.join().unwrap();
    // The dead child's lock is released.
    assert!(lock.acquire_timeout(LIMIT).unwrap());
    lock.release().unwrap();
    // The child's pending get is abandoned: the next item is ours.
    q.put(7).unwrap();
    assert_eq!(q.get_timeout(LIMIT).unwrap(), 7);
    // The dict lives on (we hold it); the server is fine.
    d.insert(&1, &2).unwrap();
    assert_eq!(d.get(&1).unwrap(), Some(2));
    drop(list);
    eventually("the list to be freed", || {
        manager.number_of_objects().unwrap() == 4
    });
    manager.shutdown().unwrap();
    assert_eq!(manager.process().unwrap().exitcode(), Some(0));
}

#[test]
fn hostile_requests_get_errors_and_the_server_survives() {
    let (port, stop, t) = rust_server("hk");
    let addr = format!("127.0.0.1:{port}");
    let connect = || Client::new(&*addr).authkey("hk").connect().unwrap();
    let reply =
        |c: &multiprocess::Connection| wire::decode_reply(&c.recv_bytes().unwrap()).unwrap();

    // A bad pickle as a control request: a traceback reply.
    let c = connect();
    c.send_bytes(b"\x80\x04garbage").unwrap();
    assert!(matches!(reply(&c), Reply::Traceback(_)));
    // An unknown control function.
    let c = connect();
    c.send_bytes(&wire::encode_request(None, "rm_rf", &[], &[]))
        .unwrap();
    assert!(matches!(reply(&c), Reply::Traceback(t) if t.contains("rm_rf")));
    // create of an unknown typeid; decref of an unknown id.
    let c = connect();
    c.send_bytes(&wire::encode_request(
        None,
        "create",
        &[Value::String("Pool".into())],
        &[],
    ))
    .unwrap();
    assert!(matches!(reply(&c), Reply::Traceback(_)));
    let c = connect();
    c.send_bytes(&wire::encode_request(
        None,
        "decref",
        &[Value::String("nope".into())],
        &[],
    ))
    .unwrap();
    assert!(matches!(reply(&c), Reply::Traceback(_)));

    // On a method channel: garbage, unknown id, unknown method, wrong arity — each
    // answered, and the channel keeps working.
    let m = Manager::connect(&*addr, "hk").unwrap();
    let d = m.dict::<String, i32>().unwrap();
    let c = connect();
    c.send_bytes(&wire::encode_request(
        None,
        "accept_connection",
        &[Value::String("t".into())],
        &[],
    ))
    .unwrap();
    assert_eq!(reply(&c), Reply::Return(Value::None));
    c.send_bytes(b"\x80\x03(((((").unwrap();
    assert!(matches!(reply(&c), Reply::Traceback(_)));
    c.send_bytes(&wire::encode_request(Some("ffffff"), "__len__", &[], &[]))
        .unwrap();
    assert!(matches!(reply(&c), Reply::Traceback(_)));
    let id = d.proxy().ident().to_string();
    c.send_bytes(&wire::encode_request(Some(&id), "__class__", &[], &[]))
        .unwrap();
    assert!(matches!(reply(&c), Reply::Traceback(t) if t.contains("not in exposed")));
    c.send_bytes(&wire::encode_request(Some(&id), "__getitem__", &[], &[]))
        .unwrap();
    assert!(matches!(reply(&c), Reply::Error { name, .. } if name == "TypeError"));
    c.send_bytes(&wire::encode_request(
        Some(&id),
        "__setitem__",
        &[Value::List(vec![]), Value::None],
        &[],
    ))
    .unwrap();
    assert!(matches!(reply(&c), Reply::Error { name, .. } if name == "TypeError"));
    c.send_bytes(&wire::encode_request(Some(&id), "__len__", &[], &[]))
        .unwrap();
    assert_eq!(reply(&c), Reply::Return(Value::I64(0)));

    // A huge length prefix: the server drops that connection without allocating.
    let c = connect();
    let mut raw = std::os::unix::net::UnixStream::from(c.as_fd().try_clone_to_owned().unwrap());
    raw.write_all(&[0x7f, 0xff, 0xff, 0xff, 0x80]).unwrap();
    raw.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(raw.read(&mut buf).unwrap(), 0, "connection closed");
    drop(c);

    // Not authenticated at all: the handshake fails, nothing is served.
    let mut raw = std::net::TcpStream::connect(&*addr).unwrap();
    raw.write_all(&[0, 0, 0, 4, b'h', b'i', b'!', b'!'])
        .unwrap();
    drop(raw);

    // Still serving.
    d.insert(&"ok".into(), &1).unwrap();
    assert_eq!(d.len().unwrap(), 1);
    drop(d);
    stop.stop();
    bounded(move || t.join().unwrap());
}

#[test]
fn non_loopback_without_key_is_refused() {
    let err = Server::sync_manager("0.0.0.0:0", None).unwrap_err();
    assert!(err.to_string().contains("authkey"), "{err}");
    Server::sync_manager("127.0.0.1:0", None).unwrap();
    Server::sync_manager("0.0.0.0:0", Some(AuthKey::from("k"))).unwrap();
}

#[test]
fn sync_primitives_across_processes() {
    fn bump(counter: DictProxy<String, i64>, lock: multiprocess::managers::LockProxy, n: usize) {
        for _ in 0..n {
            let _g = lock.guard().unwrap();
            let v = counter.get(&"n".into()).unwrap().unwrap_or(0);
            counter.insert(&"n".into(), &(v + 1)).unwrap();
        }
    }
    let manager = Manager::start().unwrap();
    let d = manager.dict::<String, i64>().unwrap();
    let lock = manager.lock().unwrap();
    let procs: Vec<Process> = (0..3)
        .map(|_| Process::new(bump, (d.clone(), lock.clone(), 50)))
        .collect();
    for p in &procs {
        p.start().unwrap();
    }
    for p in &procs {
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(0));
    }
    assert_eq!(d.get(&"n".into()).unwrap(), Some(150));

    let barrier = manager.barrier(2).unwrap();
    let b2 = barrier.clone();
    let t = std::thread::spawn(move || b2.wait().unwrap());
    let mine = barrier.wait().unwrap();
    let theirs = bounded(move || t.join().unwrap());
    let mut idx = [mine, theirs];
    idx.sort();
    assert_eq!(idx, [0, 1]);

    let cond = manager.condition().unwrap();
    let ev = manager.event().unwrap();
    let (c2, e2) = (cond.clone(), ev.clone());
    let t = std::thread::spawn(move || {
        c2.acquire().unwrap();
        e2.set().unwrap();
        let notified = c2.wait_timeout(LIMIT).unwrap();
        c2.release().unwrap();
        notified
    });
    ev.wait().unwrap();
    cond.acquire().unwrap(); // only possible once the waiter released it in wait
    cond.notify(1).unwrap();
    cond.release().unwrap();
    assert!(bounded(move || t.join().unwrap()));

    let rl = manager.rlock().unwrap();
    rl.acquire().unwrap();
    rl.acquire().unwrap();
    assert!(
        !rl.clone().try_acquire().unwrap(),
        "another owner must wait"
    );
    rl.release().unwrap();
    rl.release().unwrap();
    let err = rl.release().unwrap_err();
    assert!(matches!(&err, Error::Remote { exception, .. } if exception == "RuntimeError"));
    manager.shutdown().unwrap();
}

// ------------------------------------------------------------ load

const CLIENTS: usize = 16;
const OPS: usize = 10_000;

fn load_client(d: DictProxy<String, i64>, q: QueueProxy<i64>, me: usize) {
    // OPS operations: per round a set, a get (checked), a put and a get from the queue.
    let key = format!("client-{me}");
    let mut sum_got = 0i64;
    for i in 0..OPS / 4 {
        d.insert(&key, &(i as i64)).unwrap();
        assert_eq!(d.get(&key).unwrap(), Some(i as i64));
        q.put((me * OPS + i) as i64).unwrap();
        sum_got += q.get().unwrap();
    }
    d.insert(&format!("sum-{me}"), &sum_got).unwrap();
}

#[test]
fn load_16_clients_x_10000_ops() {
    let manager = Manager::start().unwrap();
    let d = manager.dict::<String, i64>().unwrap();
    let q = manager.queue::<i64>().unwrap();
    let procs: Vec<Process> = (0..CLIENTS)
        .map(|me| Process::new(load_client, (d.clone(), q.clone(), me)))
        .collect();
    for p in &procs {
        p.start().unwrap();
    }
    for p in &procs {
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(0), "{p}");
    }
    // Every item put was taken exactly once: the sums of what was taken add up to the
    // sum of what was put, and the queue is empty.
    let expected: i64 = (0..CLIENTS)
        .flat_map(|me| (0..OPS / 4).map(move |i| (me * OPS + i) as i64))
        .sum();
    let got: i64 = (0..CLIENTS)
        .map(|me| d.get(&format!("sum-{me}")).unwrap().unwrap())
        .sum();
    assert_eq!(got, expected);
    assert_eq!(q.len().unwrap(), 0);
    for me in 0..CLIENTS {
        assert_eq!(
            d.get(&format!("client-{me}")).unwrap(),
            Some((OPS / 4 - 1) as i64)
        );
    }
    assert_eq!(d.len().unwrap(), 2 * CLIENTS);
    manager.shutdown().unwrap();
}

// ------------------------------------------------------------ two network namespaces

/// A child process killed (and reaped) if the test fails before it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deletes the namespaces (and with them the veth pair) when dropped.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Helper run by `manager_across_network_namespaces` inside the server namespace.
#[test]
#[ignore = "helper: runs only when started by manager_across_network_namespaces"]
fn netns_helper_server() {
    let Ok(spec) = std::env::var("MP_NETNS_SERVE") else {
        return;
    };
    let (addr, key) = spec.split_once(',').unwrap();
    let server = Server::sync_manager(addr, Some(AuthKey::from(key))).unwrap();
    println!("serving on {}", server.address());
    server.serve_forever().unwrap();
    println!("server done");
}

/// Helper run inside the client namespace: uses the dict, then shuts the server down.
#[test]
#[ignore = "helper: runs only when started by manager_across_network_namespaces"]
fn netns_helper_client() {
    let Ok(spec) = std::env::var("MP_NETNS_CONNECT") else {
        return;
    };
    let (addr, key) = spec.split_once(',').unwrap();
    let err = Manager::connect(addr, "wrong-key").unwrap_err();
    assert!(matches!(err, Error::Authentication(_)), "{err:?}");
    let m = Manager::connect(addr, key).unwrap();
    let d = m.dict::<String, String>().unwrap();
    d.insert(&"over".into(), &"veth".into()).unwrap();
    assert_eq!(d.get(&"over".into()).unwrap().as_deref(), Some("veth"));
    drop(d);
    m.shutdown().unwrap();
    println!("client ok");
}

#[test]
fn manager_across_network_namespaces() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !ip(&["-V"]) {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let pid = std::process::id();
    let (s, c) = (format!("mpm-s-{pid}"), format!("mpm-c-{pid}"));
    if !ip(&["netns", "add", &s]) {
        eprintln!("skipped: cannot create network namespaces here");
        return;
    }
    let _guard = Netns(vec![s.clone(), c.clone()]);
    let (va, vb) = (format!("mpa{pid}"), format!("mpb{pid}"));
    let net = format!("10.213.{}", pid % 250);
    let (sip, cip) = (format!("{net}.1"), format!("{net}.2"));
    for args in [
        vec!["netns", "add", &c],
        vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
        vec!["link", "set", &va, "netns", &s],
        vec!["link", "set", &vb, "netns", &c],
        vec!["-n", &s, "addr", "add", &format!("{sip}/24"), "dev", &va],
        vec!["-n", &c, "addr", "add", &format!("{cip}/24"), "dev", &vb],
        vec!["-n", &s, "link", "set", "lo", "up"],
        vec!["-n", &s, "link", "set", &va, "up"],
        vec!["-n", &c, "link", "set", &vb, "up"],
    ] {
        assert!(ip(&args), "ip {args:?} failed");
    }
    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_str().unwrap();
    let key = "veth-key";

    // The Rust server, in namespace S, on the veth address.
    let mut server = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &s, exe, "netns_helper_server"])
            .args(["--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("MP_NETNS_SERVE", format!("{sip}:0,{key}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let out = server.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
            let _ = tx.send(l);
        }
    });
    let address = loop {
        let l = lines
            .recv_timeout(LIMIT)
            .expect("the server printed its address");
        // libtest prints "test netns_helper_server ... " before the helper's output.
        if let Some(i) = l.find("serving on ") {
            break l[i + "serving on ".len()..].trim().to_string();
        }
    };
    let port = address.rsplit_once(':').unwrap().1.to_string();

    // A CPython SyncManager client in namespace C.
    let py = Command::new("ip")
        .args([
            "netns", "exec", &c, "python3", "-c", PY_CLIENT, &sip, &port, key,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&py.stdout).trim(),
        "OK",
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    // A Rust client in namespace C, which shuts the server down.
    let rust = Command::new("ip")
        .args(["netns", "exec", &c, exe, "netns_helper_client"])
        .args(["--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("MP_NETNS_CONNECT", format!("{address},{key}"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rust.stdout).contains("client ok"),
        "{}\n{}",
        String::from_utf8_lossy(&rust.stdout),
        String::from_utf8_lossy(&rust.stderr)
    );
    loop {
        let l = lines.recv_timeout(LIMIT).expect("the server stopped");
        if l.contains("server done") {
            break;
        }
    }
    assert!(server.0.wait().unwrap().success());
    // The traffic went through the veth interface: it received packets.
    let stats = Command::new("ip")
        .args(["-n", &s, "-s", "link", "show", &va])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&stats.stdout).to_string();
    let rx_line = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("RX:"))
        .nth(1)
        .unwrap_or_else(|| panic!("{text}"));
    let rx_bytes: u64 = rx_line.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        rx_bytes > 10_000,
        "only {rx_bytes} bytes crossed the veth: {text}"
    );
}

// ------------------------------------------------------------ user-registered types

mod counter {
    use multiprocess::managers::{Answer, Call, PyException, Served, ServerProcess};
    use multiprocess::reduction::pickle::Value;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    /// A counter whose increment is one atomic call on the server.
    #[derive(Default)]
    pub struct Counter(AtomicI64);

    impl Served for Counter {
        fn exposed(&self) -> &[&'static str] {
            &["add", "value"]
        }
        fn call(&self, call: Call<'_>) -> Result<Answer, PyException> {
            match call.method {
                "add" => match call.required(0, "n")? {
                    Value::I64(n) => {
                        Ok(Value::I64(self.0.fetch_add(*n, Ordering::SeqCst) + n).into())
                    }
                    _ => Err(PyException::type_error("add needs an int")),
                },
                _ => Ok(Value::I64(self.0.load(Ordering::SeqCst)).into()),
            }
        }
        // Not exposed: a client cannot reach it.
    }

    pub fn serve(p: ServerProcess) {
        p.serve(|b| {
            b.sync_manager_types()
                .register("Counter", |_, _| Ok(Arc::new(Counter::default())))
        });
    }
}

fn add_many(c: multiprocess::managers::Proxy, n: usize) {
    for _ in 0..n {
        c.call::<i64>("add", (1,)).unwrap();
    }
}

#[test]
fn user_registered_type_with_allow_list() {
    let manager = Manager::builder().start_with(counter::serve).unwrap();
    let c = manager.create("Counter", (), &[]).unwrap();
    let procs: Vec<Process> = (0..4)
        .map(|_| Process::new(add_many, (c.clone(), 250)))
        .collect();
    for p in &procs {
        p.start().unwrap();
    }
    for p in &procs {
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(0));
    }
    assert_eq!(c.call::<i64>("value", ()).unwrap(), 1000);
    // Only exposed methods may be called.
    let err = c.call::<i64>("reset", ()).unwrap_err();
    assert!(
        matches!(&err, Error::Remote { exception, message } if exception == "RemoteError" && message.contains("not in exposed")),
        "{err:?}"
    );
    let err = c.call::<i64>("add", ("x",)).unwrap_err();
    assert!(
        matches!(&err, Error::Remote { exception, .. } if exception == "TypeError"),
        "{err:?}"
    );
    // The SyncManager types are there too.
    manager.dict::<i32, i32>().unwrap();
    manager.shutdown().unwrap();
}

// ------------------------------------------------------------ proxies through channels

fn receive_and_use(conn: multiprocess::Connection) {
    let d: DictProxy<String, i32> = conn.recv().unwrap();
    let q: QueueProxy<DictProxy<String, i32>> = conn.recv().unwrap();
    // A proxy that arrived through a manager queue.
    let d2 = q.get_timeout(LIMIT).unwrap();
    d.insert(&"via-connection".into(), &1).unwrap();
    d2.insert(&"via-queue".into(), &2).unwrap();
    conn.send(&"done").unwrap();
}

#[test]
fn proxies_travel_through_connections_and_manager_queues() {
    let manager = Manager::start().unwrap();
    let d = manager.dict::<String, i32>().unwrap();
    let q = manager.queue::<DictProxy<String, i32>>().unwrap();
    let (ours, theirs) = multiprocess::pipe().unwrap();
    let child = Process::new(receive_and_use, theirs);
    child.start().unwrap();
    ours.send(&d).unwrap();
    ours.send(&q).unwrap();
    // Put a proxy in the queue, then drop ours: the queued copy keeps the dict alive.
    let d2 = manager.dict::<String, i32>().unwrap();
    q.put(d2.clone()).unwrap();
    drop(d2);
    assert!(ours.poll(Some(LIMIT)).unwrap());
    assert_eq!(ours.recv::<String>().unwrap(), "done");
    child.join().unwrap();
    assert_eq!(child.exitcode(), Some(0));
    assert_eq!(d.get(&"via-connection".into()).unwrap(), Some(1));
    // d2 outlived our proxy (the child wrote to it); now that the child's is gone too,
    // only d and q remain.
    eventually("the queued dict to be freed", || {
        manager.number_of_objects().unwrap() == 2
    });
    manager.shutdown().unwrap();
}

// ------------------------------------------------------------ the fast decoder

#[test]
fn fast_decoder_agrees_with_serde_pickle_on_cpython_pickles() {
    let script = r#"
import pickle
vals = [None, True, False, 0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**31,
        2**63 - 1, -2**63, 2**64, 2**100, -2**100, 1.5, -0.0, float('inf'), 'x', '',
        'é€😀', 'a' * 300, b'', b'\x00\xff', bytearray(b'ab'), [], [1, [2, [3]]], (), (1,),
        (1, 2), (1, 2, 3), (1, 2, 3, 4), {}, {'a': 1, 'b': [None]}, {1: 'x', (1, 2): b'y'},
        set(), {1, 2, 3}, frozenset({'a'}), {'nested': {'deep': [{'k': (1, 2.5)}]}},
        ('7f30f4ab08c0', '__setitem__', ('k', [1, 2]), {}),
        (None, 'create', ('dict', {'a': 1}), {'x': 2}),
        ('#RETURN', ['a', 'b']), ('#TRACEBACK', 'text')]
shared = [1, 2]
vals.append([shared, shared])
s = 'same string'
vals.append((s, s))
for p in range(0, 6):
    for v in vals:
        print(p, pickle.dumps(v, protocol=p).hex())
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let (mut fast, mut total) = (0, 0);
    for line in text.lines() {
        let (proto, hex) = line.split_once(' ').unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        total += 1;
        let reference = multiprocess::reduction::pickle::value_from_slice(&bytes);
        if let Some(v) = wire::decode_value_fast(&bytes) {
            fast += 1;
            let r = reference.as_ref().unwrap_or_else(|e| {
                panic!("serde-pickle failed where fast did not: {e} (protocol {proto})")
            });
            assert_eq!(
                format!("{v:?}"),
                format!("{r:?}"),
                "protocol {proto}: {hex}"
            );
        }
        // The combined decoder gives serde-pickle's answer either way.
        if let Ok(r) = reference {
            assert_eq!(
                format!("{:?}", wire::decode_value(&bytes).unwrap()),
                format!("{r:?}")
            );
        }
    }
    assert!(
        fast * 2 > total,
        "fast path used for only {fast} of {total} pickles"
    );
}

#[test]
fn call_timeout_replaces_the_channel_and_loses_nothing() {
    let manager = Manager::start().unwrap();
    let q = manager.queue::<i32>().unwrap();
    q.proxy().set_timeout(Some(Duration::from_millis(100)));
    let t = Instant::now();
    let err = q.get().unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(t.elapsed() < LIMIT);
    // The proxy still works, and the abandoned server-side get took nothing.
    q.put(5).unwrap();
    assert_eq!(q.get().unwrap(), 5);
    // No reference leaked by the replacement: dropping the proxy frees the queue.
    drop(q);
    eventually("the queue to be freed", || {
        manager.number_of_objects().unwrap() == 0
    });
    manager.shutdown().unwrap();
}
