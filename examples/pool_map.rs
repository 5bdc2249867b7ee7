//! Seed "Multiprocessing in Python" (Hitesh Mishra): data parallelism with `Pool`.
//!
//! Python: `with Pool(5) as p: print(p.map(f, [1, 2, 3]))`.

use multiprocess::Pool;

fn f(x: i64) -> i64 {
    x * x
}

pub fn main() -> multiprocess::Result<()> {
    let p = Pool::new(5)?;
    println!("{:?}", p.map(f, [1, 2, 3])?);
    Ok(())
}
