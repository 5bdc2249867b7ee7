//! Criterion benchmarks of `Connection` between two processes: small-message ping-pong
//! and bulk `send_bytes`/`recv_bytes` (1 MiB and 64 MiB).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use multiprocess::pipe;

#[path = "../src/echo.rs"]
mod echo;

fn benches(c: &mut Criterion) {
    let (ours, theirs) = pipe().expect("pipe");
    let child = multiprocess::spawn(echo::serve, (theirs, false)).expect("spawn");

    c.bench_function("pipe ping-pong 16 B (two processes)", |b| {
        let msg = [7u8; 16];
        b.iter(|| {
            ours.send_bytes(&msg).unwrap();
            ours.recv_bytes().unwrap()
        })
    });

    let mut g = c.benchmark_group("pipe send_bytes/recv_bytes");
    for size in [1usize << 20, 64 << 20] {
        let data = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        if size > 1 << 20 {
            g.sample_size(10);
        }
        g.bench_with_input(BenchmarkId::new("to child", size), &data, |b, data| {
            b.iter(|| {
                ours.send_bytes(data).unwrap();
                ours.recv_bytes().unwrap()
            })
        });
    }
    g.finish();

    // And the other direction: the child cannot easily stream to us here, so measure a
    // local pair in one process (a thread as the receiver) as well.
    let mut g = c.benchmark_group("pipe recv_bytes (thread peer)");
    for size in [1usize << 20, 64 << 20] {
        let (a, b2) = pipe().unwrap();
        let data = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        if size > 1 << 20 {
            g.sample_size(10);
        }
        let sender = std::thread::spawn(move || {
            while let Ok(m) = a.recv_bytes() {
                if m.is_empty() {
                    break;
                }
                a.send_bytes(&data).unwrap();
            }
        });
        g.bench_function(BenchmarkId::new("from thread", size), |b| {
            b.iter(|| {
                b2.send_bytes(b"go").unwrap();
                b2.recv_bytes().unwrap()
            })
        });
        b2.send_bytes(b"").unwrap();
        sender.join().unwrap();
    }
    g.finish();

    ours.send_bytes(b"").unwrap();
    child.join().unwrap();
}

criterion_group!(connection, benches);
criterion_main!(connection);
