//! Seed "Multiprocessing in Python" (Hitesh Mishra): the process ids involved — the main
//! line and a child both print their module, parent id and own id.

use multiprocess::Process;

fn info(title: &str) {
    println!("{title}");
    println!("module name: {}", module_path!());
    println!("parent process: {}", std::os::unix::process::parent_id());
    println!("process id: {}", std::process::id());
}

fn f(name: String) {
    info("function f");
    println!("hello {name}");
}

pub fn main() -> multiprocess::Result<()> {
    info("main line");
    let p = Process::new(f, "bob".to_string());
    p.start()?;
    p.join()?;
    Ok(())
}
