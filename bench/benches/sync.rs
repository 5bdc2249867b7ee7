//! Criterion benchmarks of the synchronization primitives: uncontended `Lock` against an
//! in-process `std::sync::Mutex`, `RLock`, `Semaphore`, and a locked `Value` increment.

use criterion::{criterion_group, criterion_main, Criterion};
use multiprocess::{Lock, RLock, Semaphore, Value};
use std::hint::black_box;

fn benches(c: &mut Criterion) {
    let lock = Lock::new().expect("lock");
    c.bench_function("Lock acquire+release (uncontended)", |b| {
        b.iter(|| drop(black_box(lock.acquire())))
    });
    let mutex = std::sync::Mutex::new(());
    c.bench_function("std Mutex lock+unlock (uncontended)", |b| {
        b.iter(|| drop(black_box(mutex.lock().unwrap())))
    });
    let rlock = RLock::new().expect("rlock");
    c.bench_function("RLock acquire+release (uncontended)", |b| {
        b.iter(|| drop(black_box(rlock.acquire())))
    });
    let sem = Semaphore::new(1).expect("semaphore");
    c.bench_function("Semaphore acquire+release", |b| {
        b.iter(|| drop(black_box(sem.acquire())))
    });
    let v = Value::new(0i64).expect("value");
    c.bench_function("Value<i64> += 1 under its lock", |b| {
        b.iter(|| *v.lock() += 1)
    });
}

criterion_group!(group, benches);
criterion_main!(group);
