//! Attacks on `Listener`, `Client` and the manager server's accept path.

use crate::common::py::Py;
use crate::common::wait_until;
use multiprocess::connection::{Client, Listener};
use multiprocess::Connection;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A built example, started as a server process; killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(name: &str) -> Server {
        let path = crate::common::example_path(name);
        let mut child = Command::new(path)
            .args(["--address", "127.0.0.1:0", "--authkey", "secret"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the example was built by `cargo test`");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
        Server { child, port }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// (threads, open descriptors) of the server process.
    fn counts(&self) -> (usize, usize) {
        let n = |d: &str| {
            std::fs::read_dir(format!("/proc/{}/{d}", self.child.id()))
                .unwrap()
                .count()
        };
        (n("task"), n("fd"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CPython client (multiprocessing.connection.Client) that sends one message and
/// prints the echo; returns how long it took.
fn python_echo(address: &str) -> Duration {
    let t = Instant::now();
    let py = Py::run(
        "import sys\nfrom multiprocessing.connection import Client\n\
         h, p = sys.argv[1].rsplit(':', 1)\n\
         c = Client((h, int(p)), authkey=b'secret')\n\
         c.send_bytes(b'hello'); print('got', c.recv_bytes().decode(), flush=True)",
        &[address],
    );
    assert_eq!(py.expect("got"), "hello");
    py.finish();
    t.elapsed()
}

fn rust_echo(address: &str) -> Duration {
    let t = Instant::now();
    let c = Client::new(address)
        .authkey("secret")
        .handshake_timeout(Duration::from_secs(10))
        .connect()
        .unwrap();
    c.send_bytes(b"ping").unwrap();
    assert_eq!(c.recv_bytes().unwrap(), b"ping");
    t.elapsed()
}

#[test]
fn a_silent_peer_delays_no_one() {
    let server = Server::start("echo_server");
    let addr = server.address();
    let silent = TcpStream::connect(&addr).unwrap();
    // The silent peer is in: it has received its challenge.
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut first = [0u8; 4];
    std::io::Read::read_exact(&mut &silent, &mut first).unwrap();
    // Python's interpreter start-up is part of this wait; the handshake is not held up.
    assert!(rust_echo(&addr) < Duration::from_secs(1));
    assert!(python_echo(&addr) < Duration::from_secs(5));
    drop(silent);
}

/// 200 peers that each send one byte and wait, against `server`; a normal client is
/// served meanwhile, and once the handshake deadline (5 s) has passed every half-open
/// peer is closed and the thread and descriptor counts are back to where they were.
fn slowloris(server: &Server, serve: impl Fn(&str) -> Duration) {
    let addr = server.address();
    assert!(wait_until(Duration::from_secs(10), || server.counts().0 >= 1));
    let baseline = server.counts();
    let peers: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(&[0]).unwrap();
            s
        })
        .collect();
    assert!(serve(&addr) < Duration::from_secs(1));
    let (threads, _) = server.counts();
    assert!(
        threads <= baseline.0 + 2,
        "{threads} threads under slowloris (baseline {baseline:?})"
    );
    // Every half-open peer sees end of file (or a reset) after the deadline.
    for mut p in peers {
        p.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut p, &mut sink);
    }
    assert!(
        wait_until(Duration::from_secs(10), || server.counts() == baseline),
        "counts {:?}, baseline {baseline:?}",
        server.counts()
    );
}

#[test]
fn slowloris_against_a_listener() {
    let server = Server::start("echo_server");
    slowloris(&server, rust_echo);
}

#[test]
fn slowloris_against_a_manager_server() {
    let server = Server::start("manager_server");
    slowloris(&server, |addr| {
        let t = Instant::now();
        let py = Py::run(
            "import sys\nfrom multiprocessing.managers import SyncManager\n\
             h, p = sys.argv[1].rsplit(':', 1)\n\
             m = SyncManager(address=(h, int(p)), authkey=b'secret'); m.connect()\n\
             d = m.dict(); d['a'] = 1; print('got', d['a'], flush=True)",
            &[addr],
        );
        assert_eq!(py.expect("got"), "1");
        py.finish();
        // CPython's start-up is in this figure; what matters is that it is not 5 s.
        t.elapsed() / 4
    });
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mp-hostile-{}-{name}", std::process::id()))
}

/// Descriptors of this process open on `file`. Other tests in this binary open and close
/// descriptors concurrently, so only ones on a file private to the test are counted.
fn fds_on(file: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target == file)
        .count()
}

#[test]
fn descriptors_flooded_over_a_unix_listener_are_closed() {
    let path = temp_path("flood");
    let marker = temp_path("flood-marker");
    std::fs::write(&marker, b"").unwrap();
    // The count sees a descriptor open on the marker.
    let probe = std::fs::File::open(&marker).unwrap();
    assert_eq!(fds_on(&marker), 1);
    drop(probe);
    let l = Listener::bind(path.as_path(), Some("k".into())).unwrap();
    // An authenticated CPython peer passes 50 x 200 descriptors on empty messages, then
    // a native message that declares one descriptor, then plain bytes.
    let py = Py::run(
        "import os, socket, sys\nfrom multiprocessing.connection import Client\n\
         c = Client(sys.argv[1], authkey=b'k')\n\
         s = socket.socket(fileno=os.dup(c.fileno()))\n\
         fds = [os.open(sys.argv[2], os.O_RDONLY) for _ in range(200)]\n\
         for _ in range(50):\n    socket.send_fds(s, [b'\\0\\0\\0\\0'], fds)\n\
         socket.send_fds(s, [b'\\0\\0\\0\\x04\\x01\\0\\0\\0'], fds[:1])\n\
         c.send_bytes(b'done'); print('sent', flush=True); c.recv_bytes()",
        &[path.to_str().unwrap(), marker.to_str().unwrap()],
    );
    let conn = l.accept().unwrap();
    py.expect("sent");
    // Everything has arrived in the socket; nothing has been read yet.
    assert_eq!(fds_on(&marker), 0);
    for _ in 0..50 {
        assert_eq!(conn.recv_bytes().unwrap(), b"");
    }
    // The message declares a descriptor; none is kept on this connection.
    assert!(conn.recv::<Connection>().is_err());
    assert_eq!(conn.recv_bytes().unwrap(), b"done");
    let kept = fds_on(&marker);
    assert_eq!(kept, 0, "{kept} passed descriptors still open");
    conn.send_bytes(b"bye").unwrap();
    py.finish();
    std::fs::remove_file(&marker).unwrap();
}

#[test]
fn unix_socket_file_is_0600_and_a_replaced_file_is_left_alone() {
    let path = temp_path("mode");
    let l = Listener::bind(path.as_path(), Some("k".into())).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let l2 = Listener::builder(temp_path("mode2").as_path())
        .socket_mode(0o660)
        .bind()
        .unwrap();
    let mode2 = std::fs::metadata(temp_path("mode2"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode2, 0o660);
    drop(l2);
    assert!(!temp_path("mode2").exists());
    // Someone else replaces the file: dropping the listener must not remove theirs.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"someone else's").unwrap();
    drop(l);
    assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    std::fs::remove_file(&path).unwrap();
}

/// A process's resident and data memory (VmRSS, VmData), in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib << 10
    };
    (field("VmRSS:"), field("VmData:"))
}

/// Bytes that arrived on the TCP sockets listening or accepted on `port` and that their
/// process has not read yet (`rx_queue` in /proc/net/tcp).
fn unread_on(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
            let rx = u64::from_str_radix(f[4].rsplit(':').next()?, 16).ok()?;
            (local_port == port).then_some(rx)
        })
        .sum()
}

/// 64 authenticated peers each declare a 200 MiB message (under the 256 MiB limit) and
/// send 1 MiB of it: the server, reading all of it, holds memory for what arrived (plus
/// a bounded step per connection), not for what was declared; a normal peer is served
/// meanwhile, and the server's threads go back to normal once the peers leave.
#[test]
fn huge_declared_frames_cost_only_what_arrives() {
    const PEERS: usize = 64;
    const SENT: usize = 1 << 20;
    let server = Server::start("echo_server");
    let addr = server.address();
    let baseline = server.counts();
    rust_echo(&addr);
    let pid = server.child.id();
    let (rss0, data0) = memory(pid);
    let peers: Vec<Connection> = (0..PEERS)
        .map(|_| {
            let c = Client::new(addr.as_str())
                .authkey("secret")
                .handshake_timeout(Duration::from_secs(20))
                .connect()
                .unwrap();
            let mut raw = TcpStream::from(c.as_fd().try_clone_to_owned().unwrap());
            raw.write_all(&(200u32 << 20).to_be_bytes()).unwrap();
            raw.write_all(&vec![7u8; SENT]).unwrap();
            c
        })
        .collect();
    // Every byte sent has been read by the server (its receive queues are empty).
    assert!(
        wait_until(Duration::from_secs(30), || unread_on(server.port) == 0),
        "{} bytes left unread",
        unread_on(server.port)
    );
    let (rss, data) = memory(pid);
    let (rss_growth, data_growth) = (rss.saturating_sub(rss0), data.saturating_sub(data0));
    eprintln!(
        "{PEERS} peers x 200 MiB declared, 1 MiB sent: server RSS +{} MiB, data +{} MiB",
        rss_growth >> 20,
        data_growth >> 20
    );
    // Declared: 12.5 GiB. Arrived: 64 MiB; each connection may hold up to four times
    // what it received or a 4 MiB step ahead, plus its thread's stack.
    assert!(data_growth < 1 << 30, "data +{} MiB", data_growth >> 20);
    assert!(rss_growth < 512 << 20, "RSS +{} MiB", rss_growth >> 20);
    assert!(rust_echo(&addr) < Duration::from_secs(1));
    assert!(python_echo(&addr) < Duration::from_secs(5));
    drop(peers);
    assert!(
        wait_until(Duration::from_secs(10), || server.counts() == baseline),
        "counts {:?}, baseline {baseline:?}",
        server.counts()
    );
}

/// `depth` nested lists as a raw protocol-2 pickle (no pickler writes this).
fn nested_lists(depth: usize) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', depth));
    p.extend(std::iter::repeat_n(b'a', depth - 1));
    p.push(b'.');
    p
}

/// The echo server decodes every pickle it gets (`value_from_slice`) and sends it back
/// re-encoded (`value_to_vec`), on a thread with the default stack. A pickle nested
/// 100 000 deep, and a memo bomb, are refused (the server echoes the raw bytes); one at
/// the depth limit comes back as a pickle; the server lives on and serves normal peers.
#[test]
fn deep_pickles_and_memo_bombs_against_an_echo_server() {
    let mut server = Server::start("echo_server");
    let addr = server.address();
    let c = Client::new(addr.as_str())
        .authkey("secret")
        .connect()
        .unwrap();
    let deep = nested_lists(100_000);
    c.send_bytes(&deep).unwrap();
    assert_eq!(c.recv_bytes().unwrap(), deep);
    let mut bomb = vec![0x80, 4, b']', 0x94];
    for i in 0..60u32 {
        for _ in 0..2 {
            bomb.push(b'j');
            bomb.extend_from_slice(&i.to_le_bytes());
        }
        bomb.extend_from_slice(&[0x86, 0x94]);
    }
    bomb.push(b'.');
    c.send_bytes(&bomb).unwrap();
    assert_eq!(c.recv_bytes().unwrap(), bomb);
    let at_limit = nested_lists(multiprocess::reduction::pickle::MAX_DEPTH as usize);
    c.send_bytes(&at_limit).unwrap();
    let back = c.recv_bytes().unwrap();
    assert_ne!(back, at_limit, "re-encoded by the server");
    assert!(multiprocess::reduction::pickle::value_from_slice(&back).is_ok());
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    assert!(rust_echo(&addr) < Duration::from_secs(1));
    assert!(python_echo(&addr) < Duration::from_secs(5));
}
