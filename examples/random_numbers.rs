//! Seed "Python Multiprocessing Tutorial" (Elliot Forbes): four processes each print a
//! random number of their own, made in that process.

use multiprocess::Process;

fn rand_num() {
    let num: f64 = rand::random();
    println!("{num}");
}

pub fn main() -> multiprocess::Result<()> {
    let processes: Vec<Process> = (0..4).map(|_| Process::new(rand_num, ())).collect();
    for p in &processes {
        p.start()?;
    }
    for p in &processes {
        p.join()?;
    }
    Ok(())
}
