//! Seed "Multiprocessing in Python" (Hitesh Mishra): the Process class, `hello bob`.

use multiprocess::Process;

fn f(name: String) {
    println!("hello {name}");
}

pub fn main() -> multiprocess::Result<()> {
    let p = Process::new(f, "bob".to_string());
    p.start()?;
    p.join()?;
    Ok(())
}
