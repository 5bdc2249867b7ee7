//! Seed "Multiprocessing in Python" (process names): default names `Process-N`, and a
//! process named `Test`.
//!
//! As in the tutorial, one process is created and never started before the loop, so the
//! started ones are `Process-2` … `Process-6`.

use multiprocess::{current_process, Process};

fn doubler(number: i32) {
    let result = number * 2;
    println!(
        "{number} doubled to {result} by: {}",
        current_process().name()
    );
}

pub fn main() -> multiprocess::Result<()> {
    let numbers = [5, 10, 15, 20, 25];
    let mut procs = Vec::new();
    let _unused = Process::new(doubler, 5);
    for number in numbers {
        let proc = Process::new(doubler, number);
        procs.push(proc.clone());
        proc.start()?;
    }
    let proc = Process::builder().name("Test").build(doubler, 2);
    proc.start()?;
    procs.push(proc);
    for proc in &procs {
        proc.join()?;
    }
    Ok(())
}
