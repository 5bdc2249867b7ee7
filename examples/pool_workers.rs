//! Seed "Python Multiprocessing Tutorial" (Elliot Forbes), "Pools" expanded: each task
//! prints the worker that runs it, and two `map` calls reuse the same workers.

use multiprocess::{cpu_count, current_process, Pool};

fn my_func(x: u32) -> u128 {
    println!("{}", current_process());
    u128::from(x).pow(x)
}

pub fn main() -> multiprocess::Result<()> {
    let pool = Pool::new(cpu_count())?;
    let result = pool.map(my_func, [4, 2, 3, 5, 3, 2, 1, 2])?;
    let result_set_2 = pool.map(my_func, [4, 6, 5, 4, 6, 3, 23, 4, 6])?;
    println!("{result:?}");
    println!("{result_set_2:?}");
    Ok(())
}
