//! Criterion benchmarks of `Queue` between two processes: ping-pong latency of a small
//! item (a put in each direction), and streaming throughput of 64 KiB and 1 MiB items to a
//! child that acknowledges each batch.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use multiprocess::Queue;
use serde_bytes::ByteBuf;

/// The child: echoes small items back; for a buffer, counts it and acknowledges every
/// `BATCH`-th; stops on `None`.
fn serve((from, to): (Queue<Option<ByteBuf>>, Queue<u64>)) {
    let mut n = 0u64;
    while let Some(item) = from.get().unwrap() {
        if item.len() <= 16 {
            to.put(item.len() as u64).unwrap();
        } else {
            n += 1;
            if n.is_multiple_of(BATCH) {
                to.put(n).unwrap();
            }
        }
    }
}

const BATCH: u64 = 16;

fn benches(c: &mut Criterion) {
    let to_child: Queue<Option<ByteBuf>> = Queue::new().unwrap();
    let from_child: Queue<u64> = Queue::new().unwrap();
    let child = multiprocess::spawn(serve, (to_child.clone(), from_child.clone())).unwrap();

    c.bench_function("queue ping-pong 8 B (two processes)", |b| {
        let item = Some(ByteBuf::from(vec![1u8; 8]));
        b.iter(|| {
            to_child.put_ref(&item).unwrap();
            from_child.get().unwrap()
        })
    });

    let mut g = c.benchmark_group("queue stream to child");
    for size in [64usize << 10, 1 << 20] {
        let item = Some(ByteBuf::from(vec![0x5au8; size]));
        g.throughput(Throughput::Bytes(size as u64 * BATCH));
        g.bench_with_input(BenchmarkId::new("batch of 16", size), &item, |b, item| {
            b.iter(|| {
                for _ in 0..BATCH {
                    to_child.put_ref(item).unwrap();
                }
                from_child.get().unwrap()
            })
        });
    }
    g.finish();

    to_child.put(None).unwrap();
    child.join().unwrap();
}

criterion_group!(queue, benches);
criterion_main!(queue);
