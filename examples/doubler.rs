//! Seed "Multiprocessing in Python" (Process): five processes each double a number and
//! say which process id did it.
//!
//! Python: `Process(target=doubler, args=(number,))`, then `start()` and `join()` each.

use multiprocess::Process;

fn doubler(number: i32) {
    let result = number * 2;
    let proc = std::process::id();
    println!("{number} doubled to {result} by process id: {proc}");
}

pub fn main() -> multiprocess::Result<()> {
    let numbers = [5, 10, 15, 20, 25];
    let mut procs = Vec::new();
    for number in numbers {
        let proc = Process::new(doubler, number);
        proc.start()?;
        procs.push(proc);
    }
    for proc in &procs {
        proc.join()?;
    }
    Ok(())
}
