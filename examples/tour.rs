//! Every seed tutorial example, one after another: `cargo run --release --example tour`.

#[path = "cpu_count.rs"]
mod cpu_count;
#[path = "doubler.rs"]
mod doubler;
#[path = "doubler_names.rs"]
mod doubler_names;
#[path = "hello.rs"]
mod hello;
#[path = "info.rs"]
mod info;
#[path = "pool_map.rs"]
mod pool_map;
#[path = "pool_my_func.rs"]
mod pool_my_func;
#[path = "pool_squares.rs"]
mod pool_squares;
#[path = "pool_workers.rs"]
mod pool_workers;
#[path = "random_numbers.rs"]
mod random_numbers;
#[path = "square_cube.rs"]
mod square_cube;
#[path = "squares_serial.rs"]
mod squares_serial;
#[path = "worker_ids.rs"]
mod worker_ids;

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn main() -> multiprocess::Result<()> {
    section("cpu_count: how many CPUs");
    cpu_count::main();
    section("doubler: five processes with their pids");
    doubler::main()?;
    section("doubler_names: default names and a process named Test");
    doubler_names::main()?;
    section("square_cube: two processes");
    square_cube::main()?;
    section("worker_ids: pids and is_alive");
    worker_ids::main()?;
    section("squares_serial: one process");
    squares_serial::main();
    section("hello: the Process class");
    hello::main()?;
    section("info: the process ids involved");
    info::main()?;
    section("random_numbers: four processes put random numbers in a Queue");
    random_numbers::main()?;
    section("pool_squares: a Pool squares a list");
    pool_squares::main()?;
    section("pool_map: Pool(5).map");
    pool_map::main()?;
    section("pool_my_func: x**x in a pool");
    pool_my_func::main()?;
    section("pool_workers: which worker ran each task");
    pool_workers::main()?;
    Ok(())
}
