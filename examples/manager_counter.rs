//! A dict shared by processes through a manager: each worker counts words into it.
//!
//! The read-modify-write of a counter is guarded by a manager lock — without it two
//! workers could read the same old value and one increment would be lost.

use multiprocess::managers::{DictProxy, LockProxy, Manager};
use multiprocess::Process;

fn count(words: Vec<String>, counts: DictProxy<String, u64>, lock: LockProxy) {
    for w in words {
        let _held = lock.guard().unwrap();
        let n = counts.get(&w).unwrap().unwrap_or(0);
        counts.insert(&w, &(n + 1)).unwrap();
    }
}

fn main() -> multiprocess::Result<()> {
    let text = "the cat sat on the mat the end";
    let manager = Manager::start()?;
    let counts = manager.dict::<String, u64>()?;
    let lock = manager.lock()?;
    let words: Vec<String> = text.split(' ').map(String::from).collect();
    let workers: Vec<Process> = words
        .chunks(3)
        .map(|chunk| Process::new(count, (chunk.to_vec(), counts.clone(), lock.clone())))
        .collect();
    for w in &workers {
        w.start()?;
    }
    for w in &workers {
        w.join()?;
    }
    let mut items = counts.items()?;
    items.sort();
    for (word, n) in items {
        println!("{word}: {n}");
    }
    manager.shutdown()
}
