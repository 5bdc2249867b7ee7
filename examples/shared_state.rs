//! Shared state between processes (Python's "Sharing state between processes"): a counter
//! under its lock, an array, and a named shared-memory segment.
//!
//! `cargo run --example shared_state`

use multiprocess::{Array, Process, Result, SharedMemory, Value};

/// Adds one to the counter `n` times, each under the counter's lock.
fn count(args: (Value<i64>, u32)) {
    let (counter, n) = args;
    for _ in 0..n {
        *counter.lock() += 1;
    }
}

/// Python's docs example: set a number, negate an array.
fn fill(args: (Value<f64>, Array<i32>)) {
    let (num, arr) = args;
    num.set(2.5);
    for x in arr.lock().iter_mut() {
        *x = -*x;
    }
}

/// Attaches to a segment by name and writes a greeting into it.
fn greet(name: String) {
    let mut shm = SharedMemory::attach(&name).expect("the segment exists");
    let msg = b"hello from a child";
    shm.as_mut_slice()[..msg.len()].copy_from_slice(msg);
}

fn main() -> Result<()> {
    let counter = Value::new(0i64)?;
    let procs: Vec<Process> = (0..4)
        .map(|_| Process::new(count, (counter.clone(), 1000)))
        .collect();
    for p in &procs {
        p.start()?;
    }
    for p in &procs {
        p.join()?;
    }
    println!("counter: {}", counter.get());

    let num = Value::new(0.0f64)?;
    let arr = Array::from_slice(&(0..10).collect::<Vec<i32>>())?;
    let p = Process::new(fill, (num.clone(), arr.clone()));
    p.start()?;
    p.join()?;
    println!("num: {}", num.get());
    println!("arr: {:?}", arr.to_vec());

    // Removed when this process ends, however it ends (see SharedMemory's docs).
    let shm = SharedMemory::create(None, 64)?;
    let p = Process::new(greet, shm.name().to_string());
    p.start()?;
    p.join()?;
    let text = &shm.as_slice()[..18];
    println!("shared memory says: {}", String::from_utf8_lossy(text));
    Ok(())
}
