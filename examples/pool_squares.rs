//! Seed "Intermediate Python (Part-7)": a pool squares a list, and each worker says which
//! item it took.

use multiprocess::Pool;

fn square(n: i64) -> i64 {
    println!("Worker process id for {n}: {}", std::process::id());
    n * n
}

pub fn main() -> multiprocess::Result<()> {
    // input list
    let mylist = vec![1, 2, 3, 4, 5];
    // creating a pool object
    let p = Pool::new(0)?;
    // map list to target function
    let result = p.map(square, mylist)?;
    println!("{result:?}");
    Ok(())
}
