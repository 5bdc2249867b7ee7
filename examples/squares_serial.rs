//! Seed "Intermediate Python (Part-7)": squares computed one by one in a single process,
//! the baseline that `Pool` then spreads over all cores.

fn square(n: i64) -> i64 {
    n * n
}

pub fn main() {
    let mylist = [1, 2, 3, 4, 5];
    let result: Vec<i64> = mylist.into_iter().map(square).collect();
    println!("{result:?}");
}
