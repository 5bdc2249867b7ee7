//! Arbitrary bytes as a native message into typed receivers (owned and borrowed), for
//! representative types: bulk sequences, strings, maps, enums, and recursive types.
//! Every outcome must be a value or a typed error: no panic, no abort on allocation, no
//! stack overflow, no hang; and the connection delivers the next message after a bad one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiprocess::{pipe, Connection, Error};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Serialize, Deserialize, Debug)]
struct Node {
    value: u32,
    next: Option<Box<Node>>,
}

#[derive(Serialize, Deserialize, Debug)]
enum Tree {
    Leaf(Vec<u8>),
    Branch(Vec<Tree>),
    Named { name: String, kids: Box<Tree> },
}

#[derive(Serialize, Deserialize, Debug)]
struct Frame {
    id: u64,
    pixels: Vec<u8>,
    tags: HashMap<String, Vec<char>>,
    scale: Option<f64>,
}

#[derive(Deserialize, Debug)]
struct Borrowed<'a> {
    #[allow(dead_code)]
    name: &'a str,
    #[serde(borrow, with = "serde_bytes")]
    #[allow(dead_code)]
    data: &'a [u8],
}

fn check<T>(r: multiprocess::Result<T>) {
    match r {
        Ok(_) | Err(Error::Serialization(_)) => {}
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

const KINDS: usize = 9;

fn receive(conn: &Connection, kind: usize, buf: &mut Vec<u8>) {
    match kind {
        0 => check(conn.recv::<(String, Vec<u8>)>()),
        1 => check(conn.recv::<Vec<Vec<f64>>>()),
        2 => check(conn.recv::<Frame>()),
        3 => check(conn.recv::<Node>()),
        4 => check(conn.recv::<Tree>()),
        5 => check(conn.recv::<(Vec<bool>, Vec<char>, Vec<i128>)>()),
        6 => check(conn.recv::<(Vec<()>, serde_bytes::ByteBuf, u16)>()),
        7 => check(conn.recv_borrowed::<Borrowed>(buf)),
        _ => check(conn.recv::<HashMap<u64, Option<Vec<String>>>>()),
    }
}

fuzz_target!(|data: &[u8]| {
    let (tx, rx) = pipe().unwrap();
    let message = [&[0u8; 4][..], data].concat();
    let writer = std::thread::spawn(move || {
        for _ in 0..KINDS {
            tx.send_bytes(&message).unwrap();
        }
        tx.send(&7u64).unwrap();
    });
    let mut buf = Vec::new();
    for kind in 0..KINDS {
        receive(&rx, kind, &mut buf);
    }
    assert_eq!(rx.recv::<u64>().unwrap(), 7);
    writer.join().unwrap();
});
