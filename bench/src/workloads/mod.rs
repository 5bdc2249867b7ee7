//! One module per workload; each has `pub fn rows(iters: usize) -> Vec<Row>`.

pub mod bulk;
pub mod bulk_pool;
pub mod connection;
pub mod managers;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod pool;
pub mod primes;
pub mod process;
pub mod queue;
pub mod sync;
