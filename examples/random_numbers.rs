//! Seed "Python Multiprocessing Tutorial" (Elliot Forbes), section "Queues": four processes
//! each put a random number of their own into a `Queue`; the parent gets them and prints
//! them as a list.

use multiprocess::{Process, Queue};

fn rand_num(queue: Queue<f64>) {
    let num: f64 = rand::random();
    queue.put(num).unwrap();
}

pub fn main() -> multiprocess::Result<()> {
    let queue = Queue::new()?;

    let processes: Vec<Process> = (0..4)
        .map(|_| Process::new(rand_num, queue.clone()))
        .collect();

    for p in &processes {
        p.start()?;
    }
    // Joining before getting is safe here: `put` writes straight into shared memory, so a
    // child that has put its number can exit at once (no feeder thread to flush).
    for p in &processes {
        p.join()?;
    }

    let results = processes
        .iter()
        .map(|_| queue.get())
        .collect::<multiprocess::Result<Vec<f64>>>()?;

    println!("{results:?}");
    Ok(())
}
