//! Seed "Intermediate Python (Part-7)": the process ids of the main process and of two
//! workers, and whether the workers are alive after `join`.

use multiprocess::Process;

fn worker1() {
    println!("ID of process running worker1: {}", std::process::id());
}

fn worker2() {
    println!("ID of process running worker2: {}", std::process::id());
}

/// Python spells booleans `True`/`False`; the tutorial's output does too.
fn py(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

pub fn main() -> multiprocess::Result<()> {
    println!("ID of main process: {}", std::process::id());
    let p1 = Process::new(worker1, ());
    let p2 = Process::new(worker2, ());
    p1.start()?;
    p2.start()?;
    println!("ID of process p1: {}", p1.pid().expect("started"));
    println!("ID of process p2: {}", p2.pid().expect("started"));
    p1.join()?;
    p2.join()?;
    println!("Both processes finished execution!");
    println!("Process p1 is alive: {}", py(p1.is_alive()));
    println!("Process p2 is alive: {}", py(p2.is_alive()));
    Ok(())
}
