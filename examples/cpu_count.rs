//! Seed "We already introed about it": how many CPUs can this program use?
//!
//! Python: `print(mp.cpu_count())`.

pub fn main() {
    println!("{}", multiprocess::cpu_count());
}
