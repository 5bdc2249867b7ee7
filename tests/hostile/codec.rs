//! The native codec under crafted input: a bad message is `Error::Serialization` for that
//! message only, never an abort, a stack overflow or a huge allocation, and the same
//! connection or queue delivers the next good message.

use crate::common::{joined, Reaper, LONG};
use multiprocess::{pipe, Connection, Error, Process, Queue};
use serde::Deserialize;
use serde_bytes::ByteBuf;
use std::fmt::Debug;

/// A native message: no descriptors, then the encoded value.
fn native(encoded: &[u8]) -> Vec<u8> {
    [&[0u8; 4][..], encoded].concat()
}

fn len(n: u64) -> [u8; 8] {
    n.to_le_bytes()
}

/// The crafted messages, each with the type the receiver asks for (checked in order).
fn crafted() -> Vec<Vec<u8>> {
    vec![
        // 0: `(String, Vec<u8>)` whose string says 2^48 bytes (19 bytes in all).
        native(&[&len(1 << 48)[..], b"abc"].concat()),
        // 1: `Vec<u64>` of 2^61 elements (the byte count overflows).
        native(&len(1 << 61)),
        // 2: nested `Vec<Vec<Vec<Vec<u16>>>>` where every level claims 2^40 elements.
        native(&[len(1 << 40); 4].concat()),
        // 3: `Vec<()>` of 2^62 zero-sized elements (no bytes to run out of).
        native(&len(1 << 62)),
        // 4: a recursive list a million levels deep.
        native(&len(1).repeat(1_000_000)),
        // 5: invalid UTF-8 in a `String`.
        native(&[&len(2)[..], &[0xc3, 0x28]].concat()),
        // 6: a bool that is 2.
        native(&[2]),
        // 7: an enum index past the last variant.
        native(&9u32.to_le_bytes()),
        // 8: a truncated value.
        native(&[1, 2, 3]),
    ]
}

#[derive(Deserialize, Debug)]
#[allow(dead_code)]
struct Tree(Vec<Tree>);

#[derive(Deserialize, Debug)]
#[allow(dead_code)]
enum Choice {
    A,
    B(u8),
}

fn send_crafted_then_good(c: Connection) {
    for m in crafted() {
        c.send_bytes(&m).unwrap();
    }
    c.send(&("good".to_string(), vec![1u8, 2, 3])).unwrap();
}

fn expect_bad<T: for<'de> Deserialize<'de> + Debug>(c: &Connection, what: &str) {
    match c.recv::<T>() {
        Err(Error::Serialization(msg)) => eprintln!("{what}: {msg}"),
        other => panic!("{what}: expected Error::Serialization, got {other:?}"),
    }
}

/// The 19-byte frame of the hostile-input issue, and its relatives, from a child process
/// over a real socket: each is an error for that message, and the connection goes on.
#[test]
fn crafted_messages_fail_alone_and_the_connection_goes_on() {
    let (a, b) = pipe().unwrap();
    let child = Reaper(Process::new(send_crafted_then_good, b));
    child.0.start().unwrap();
    expect_bad::<(String, Vec<u8>)>(&a, "string of 2^48 bytes");
    expect_bad::<Vec<u64>>(&a, "2^61 u64s");
    expect_bad::<Vec<Vec<Vec<Vec<u16>>>>>(&a, "nested claims");
    expect_bad::<Vec<()>>(&a, "zero-sized bomb");
    expect_bad::<Tree>(&a, "deep nesting");
    expect_bad::<String>(&a, "invalid UTF-8");
    expect_bad::<bool>(&a, "invalid bool");
    expect_bad::<Choice>(&a, "invalid variant");
    expect_bad::<u64>(&a, "truncated");
    let good: (String, Vec<u8>) = a.recv().unwrap();
    assert_eq!(good, ("good".to_string(), vec![1, 2, 3]));
    assert_eq!(joined(&child.0), 0);
}

/// The same lies told through a queue, by a producer that encodes another type into it:
/// a small item (one chunk) and a large one streamed through the ring (its real bytes
/// arrive over time, so the consumer cannot check the length up front: it must not
/// allocate ahead of them).
/// The same queue under the producer's false item type and under the true one.
type Lies = (Queue<(u64, ByteBuf)>, Queue<(String, Vec<u8>)>);

fn put_lies((liar, honest): Lies) {
    liar.put((1 << 48, ByteBuf::from(vec![1u8; 3]))).unwrap();
    liar.put((1 << 48, ByteBuf::from(vec![1u8; 8 << 20])))
        .unwrap();
    honest.put(("good".to_string(), vec![4, 5])).unwrap();
}

#[test]
fn crafted_queue_items_fail_alone_and_the_queue_goes_on() {
    let q: Queue<(String, Vec<u8>)> = Queue::new().unwrap();
    // The same queue, seen as another item type (a handle does not carry its type).
    let (a, b) = pipe().unwrap();
    a.send(&q).unwrap();
    let liar: Queue<(u64, ByteBuf)> = b.recv().unwrap();
    let child = Reaper(Process::new(put_lies, (liar, q.clone())));
    child.0.start().unwrap();
    for what in ["small item", "streamed item"] {
        match q.get_timeout(LONG) {
            Err(Error::Serialization(msg)) => eprintln!("{what}: {msg}"),
            other => panic!("{what}: expected Error::Serialization, got {other:?}"),
        }
    }
    assert_eq!(
        q.get_timeout(LONG).unwrap(),
        ("good".to_string(), vec![4, 5])
    );
    assert_eq!(joined(&child.0), 0);
}

/// A sender cannot even build a message nested past the limit: it gets the error, and
/// what it could send is received.
#[test]
fn too_deep_values_are_refused_by_the_sender() {
    #[derive(serde::Serialize, Deserialize, Debug, PartialEq)]
    struct Node(Option<Box<Node>>);
    let mut n = Node(None);
    for _ in 0..10_000 {
        n = Node(Some(Box::new(n)));
    }
    let (a, b) = pipe().unwrap();
    match a.send(&n) {
        Err(Error::Serialization(msg)) => assert!(msg.contains("deeper"), "{msg}"),
        other => panic!("expected Error::Serialization, got {other:?}"),
    }
    // Drop the deep value iteratively (its own drop would recurse).
    let mut cur = n.0.take();
    while let Some(mut b) = cur {
        cur = b.0.take();
    }
    let shallow = Node(Some(Box::new(Node(None))));
    a.send(&shallow).unwrap();
    assert_eq!(b.recv::<Node>().unwrap(), shallow);
}

/// A protocol-2 pickle of `depth` nested lists (`[[[...]]]`), as raw opcodes: no pickler
/// writes this (CPython's raises `RecursionError`), an attacker does.
fn nested_lists(depth: usize) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', depth));
    p.extend(std::iter::repeat_n(b'a', depth - 1));
    p.push(b'.');
    p
}

/// A "billion laughs": a list, then 60 times `t = (t, t)` through the memo (2^60 objects
/// once expanded, 860 bytes on the wire).
fn memo_bomb() -> Vec<u8> {
    let mut p = vec![0x80, 4, b']', 0x94];
    for i in 0..60u32 {
        for _ in 0..2 {
            p.push(b'j');
            p.extend_from_slice(&i.to_le_bytes());
        }
        p.extend_from_slice(&[0x86, 0x94]);
    }
    p.push(b'.');
    p
}

/// A pickled list nested `depth` levels, as a typed receiver sees it.
#[derive(Deserialize, Debug)]
struct Nest(Vec<Nest>);

impl Nest {
    fn depth(&self) -> usize {
        // Iteratively: the test's own walk must not be what overflows.
        let (mut d, mut cur) = (1, self);
        while let Some(next) = cur.0.first() {
            d += 1;
            cur = next;
        }
        d
    }
}

fn send_pickle_bombs_then_good(c: Connection) {
    let at_limit = multiprocess::reduction::pickle::MAX_DEPTH as usize;
    for m in [
        nested_lists(100_000),
        nested_lists(100_000),
        memo_bomb(),
        memo_bomb(),
        nested_lists(at_limit),
        nested_lists(at_limit),
        nested_lists(at_limit),
    ] {
        c.send_bytes(&m).unwrap();
    }
    c.send_pickle(&("good", 7)).unwrap();
}

/// Pickles nested past the limit, and memo bombs, from a child process over a real
/// socket, into the dynamic and typed pickle receivers: each is an `Error::Protocol` for
/// that message (quickly, without expanding anything), the receiver's thread survives
/// (it is a test thread with the default 2 MiB stack), and the next message arrives.
#[test]
fn deep_and_memo_bomb_pickles_fail_alone_and_the_connection_goes_on() {
    let (a, b) = pipe().unwrap();
    let child = Reaper(Process::new(send_pickle_bombs_then_good, b));
    child.0.start().unwrap();
    let t = std::time::Instant::now();
    let refused = |r: multiprocess::Result<()>, what: &str| match r {
        Err(Error::Protocol(msg)) => eprintln!("{what}: {msg}"),
        other => panic!("{what}: expected Error::Protocol, got {other:?}"),
    };
    refused(a.recv_pickle_value().map(drop), "100 000 levels, dynamic");
    refused(a.recv_pickle::<Nest>().map(drop), "100 000 levels, typed");
    refused(a.recv_pickle_value().map(drop), "memo bomb, dynamic");
    refused(
        a.recv_pickle::<Vec<Vec<u8>>>().map(drop),
        "memo bomb, typed",
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    // At the limit: decoded, and dropped on this thread.
    let v = a.recv_pickle_value().unwrap();
    assert!(matches!(&v, multiprocess::reduction::pickle::Value::List(l) if l.len() == 1));
    drop(v);
    let n = a.recv_pickle::<Nest>().unwrap();
    assert_eq!(
        n.depth(),
        multiprocess::reduction::pickle::MAX_DEPTH as usize
    );
    drop(n);
    // A receiver whose type does not nest gives up at the first level that does not fit.
    assert!(matches!(
        a.recv_pickle::<(String, i64)>(),
        Err(Error::Serialization(_))
    ));
    assert_eq!(
        a.recv_pickle::<(String, i64)>().unwrap(),
        ("good".to_string(), 7)
    );
    assert_eq!(joined(&child.0), 0);
}

/// Every input a fuzzer ever failed on (fuzz/regressions/<target>/) goes through the
/// decoders of its target again: each gives a value or a typed error.
#[test]
fn fuzz_regression_inputs_decode_or_fail_cleanly() {
    use multiprocess::managers::wire::{decode_reply, decode_request};
    use multiprocess::reduction::pickle;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut seen = 0;
    for target in std::fs::read_dir(&root).unwrap() {
        let target = target.unwrap().path();
        let name = target.file_name().unwrap().to_string_lossy().into_owned();
        for input in std::fs::read_dir(&target).unwrap() {
            let data = std::fs::read(input.unwrap().path()).unwrap();
            match name.as_str() {
                "manager_request" => {
                    let _ = decode_request(&data);
                    let _ = decode_reply(&data);
                    let _ = pickle::value_from_slice(&data);
                    let _ = pickle::from_slice::<(String, Vec<i64>)>(&data);
                }
                "frame" => {
                    // As the `frame` target: the bytes as a peer's stream, then every
                    // kind of receive in turn until the stream ends or is unreadable.
                    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
                    std::io::Write::write_all(&mut &a, &data[..data.len().min(100_000)]).unwrap();
                    drop(a);
                    let mut conn = multiprocess::Connection::from(b);
                    conn.set_max_message_size(Some(1 << 20));
                    let mut reused = Vec::new();
                    for i in 0..10_000 {
                        let r = match i % 6 {
                            0 => conn.recv_bytes().map(drop),
                            1 => conn.recv_pickle_value().map(drop),
                            2 => conn.recv::<(String, Vec<u32>, Option<f64>)>().map(drop),
                            3 => conn.recv::<Vec<(bool, char, Vec<u8>)>>().map(drop),
                            4 => conn.recv_borrowed::<(&str, u64)>(&mut reused).map(drop),
                            _ => conn.recv_bytes_into(&mut [0u8; 16]).map(drop),
                        };
                        if let Err(Error::Eof | Error::Protocol(_) | Error::Io(_)) = r {
                            break;
                        }
                    }
                }
                other => panic!("regression inputs for an unknown target {other:?}"),
            }
            seen += 1;
        }
    }
    assert!(seen > 0, "no regression inputs under {}", root.display());
}
