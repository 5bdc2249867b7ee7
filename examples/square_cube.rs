//! Seed "Intermediate Python (Part-7)": two processes print a square and a cube.

use multiprocess::Process;

fn print_cube(num: i64) {
    println!("Cube: {}", num * num * num);
}

fn print_square(num: i64) {
    println!("Square: {}", num * num);
}

pub fn main() -> multiprocess::Result<()> {
    // creating processes
    let p1 = Process::new(print_square, 10);
    let p2 = Process::new(print_cube, 10);
    // starting processes
    p1.start()?;
    p2.start()?;
    // wait until both are finished
    p1.join()?;
    p2.join()?;
    // both processes finished
    println!("Done!");
    Ok(())
}
