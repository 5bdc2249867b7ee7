//! One module per workload; each has `pub fn rows(iters: usize) -> Vec<Row>`.

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod bulk;
pub mod managers;
pub mod pool;
pub mod primes;
pub mod process;
pub mod queue;
pub mod sync;
