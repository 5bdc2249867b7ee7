//! Seed "Python Multiprocessing Tutorial" (Elliot Forbes), "Pools": `my_func` prints x**x
//! for each input, in a pool of `cpu_count()` workers.

use multiprocess::{cpu_count, Pool};

fn my_func(x: u32) {
    println!("{}", u128::from(x).pow(x));
}

pub fn main() -> multiprocess::Result<()> {
    let pool = Pool::new(cpu_count())?;
    pool.map(my_func, [4, 2, 3])?;
    Ok(())
}
