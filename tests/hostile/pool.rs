//! Attacks on a pool from inside one of its workers: a task that writes to the worker's
//! channel to the pool as the worker would, with a reply the pool must not believe.
#![allow(unsafe_code)] // reads the worker's progress page and writes its socket, as an attacker in the worker would

use multiprocess::{Error, Pool, StartMethod};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Runs in a pool worker (started by `spawn`: it maps only its own progress page). Sends
/// the pool a reply for the chunk it is running that claims `claimed` results (the chunk
/// holds one item), then returns 7 as usual.
fn impersonate(claimed: u64) -> i64 {
    // The running chunk's number: slot 0 of the worker's progress page.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let page = maps
        .lines()
        .find(|l| l.contains("multiprocess-page"))
        .expect("the progress page is mapped");
    let addr = usize::from_str_radix(page.split('-').next().unwrap(), 16).unwrap();
    // SAFETY: the page is mapped shared and readable at `addr` (4096 bytes, page-aligned);
    // slot 0 is an aligned u64 the worker only accesses atomically.
    let seq = unsafe { (*(addr as *const AtomicU64)).load(Ordering::SeqCst) };
    // The worker's channel to the pool: the last socket it holds (the process channel
    // comes first).
    let fd: i32 = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .max()
        .expect("a socket to the pool");
    // [count][values][failures: empty Vec][offset of the failures], after [tag][seq].
    let mut results = claimed.to_le_bytes().to_vec();
    for v in 0..claimed {
        results.extend_from_slice(&(v as i64 * 100).to_le_bytes());
    }
    let failures_at = results.len() as u64;
    results.extend_from_slice(&0u64.to_le_bytes());
    results.extend_from_slice(&failures_at.to_le_bytes());
    let mut msg = vec![3u8];
    msg.extend_from_slice(&seq.to_le_bytes());
    msg.extend_from_slice(&results);
    let mut frame = (msg.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&msg);
    // SAFETY: `fd` is open in this process; the File is forgotten, not closed.
    let mut sock = unsafe { std::fs::File::from_raw_fd(fd) };
    sock.write_all(&frame).unwrap();
    std::mem::forget(sock);
    7
}

fn plain(x: u64) -> i64 {
    x as i64
}

/// A reply with more results than its chunk has items, or none, fails that chunk's item
/// with a protocol error; the other items and the pool are not affected.
#[test]
fn a_reply_with_another_number_of_results_fails_its_chunk_only() {
    let pool = Pool::builder()
        .processes(1)
        .start_method(StartMethod::Spawn)
        .build()
        .unwrap();
    for claimed in [5, 0] {
        match pool.apply(impersonate, claimed) {
            Err(Error::Protocol(m)) => assert!(m.contains("number of results"), "{m}"),
            other => panic!("claimed {claimed}: {other:?}"),
        }
        assert_eq!(
            pool.map(plain, 0..100u64).unwrap(),
            (0..100).collect::<Vec<_>>()
        );
    }
}
