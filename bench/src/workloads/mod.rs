//! One module per workload; each has `pub fn rows(iters: usize) -> Vec<Row>`.

pub mod managers;
pub mod pool;
pub mod process;
