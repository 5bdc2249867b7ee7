//! Issue 13: an unmodified CPython 3.11 `SyncManager` program (tests/py/manager_scenarios.py:
//! slices, proxies inside shared objects, forked children receiving proxies, Barrier,
//! dict iteration, Namespace, Array, Value, set, JoinableQueue, Condition, every typeid)
//! behaves on our server as on CPython's own. The same script runs against both servers;
//! where CPython's server does something ours cannot (run Python code: `Pool`,
//! `Barrier(action=)`), the scenario pins our clear refusal.

mod common;

use common::py::{Py, LIMIT};
use multiprocess::connection::{Address, AuthKey};
use multiprocess::managers::Server;

/// A manager server serving on its own thread until [`Running::stop`].
struct Running {
    port: u16,
    stop: multiprocess::managers::StopHandle,
    thread: std::thread::JoinHandle<()>,
}

impl Running {
    fn serve(server: Server) -> Running {
        let Address::Inet { port, .. } = server.address().clone() else {
            panic!("not inet")
        };
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || server.serve_forever().unwrap());
        Running { port, stop, thread }
    }

    fn stop(self) {
        self.stop.stop();
        self.thread.join().unwrap();
    }
}

const SCENARIOS: &str = include_str!("py/manager_scenarios.py");

/// Runs the scenario client against `port`; returns `(name, passed, detail)` per scenario.
fn run_scenarios(port: u16, key: &str) -> Vec<(String, bool, String)> {
    let mut py = Py::run(SCENARIOS, &["client", "127.0.0.1", &port.to_string(), key]);
    let mut out = Vec::new();
    loop {
        let line = py.line();
        if let Some(total) = line.strip_prefix("passed: ") {
            let (_, n) = total.split_once('/').expect("passed: N/M");
            assert_eq!(n.parse::<usize>().unwrap(), out.len());
            break;
        }
        let (name, rest) = line.split_once(": ").expect("name: PASS|FAIL detail");
        let (verdict, detail) = rest.split_once(' ').unwrap_or((rest, ""));
        out.push((
            name.to_string(),
            verdict == "PASS",
            detail.trim().to_string(),
        ));
    }
    assert!(py.wait_exit().success());
    out
}

fn assert_all_pass(results: &[(String, bool, String)]) {
    let failed: Vec<_> = results.iter().filter(|r| !r.1).collect();
    assert!(failed.is_empty(), "failed scenarios: {failed:#?}");
    assert!(results.len() >= 27, "only {} scenarios ran", results.len());
}

fn detail<'a>(results: &'a [(String, bool, String)], name: &str) -> &'a str {
    &results
        .iter()
        .find(|r| r.0 == name)
        .unwrap_or_else(|| panic!("no scenario {name}"))
        .2
}

#[test]
fn cpython_program_runs_on_rust_server() {
    let key = "scenarios";
    let server = Server::sync_manager("127.0.0.1:0", Some(AuthKey::from(key))).unwrap();
    let running = Running::serve(server);
    let port = running.port;
    let results = run_scenarios(port, key);
    running.stop();
    assert_all_pass(&results);
    // What CPython's server does by running Python code, ours refuses by name.
    let pool = detail(&results, "pool");
    assert!(
        pool.starts_with("refused:") && pool.contains("Pool"),
        "{pool}"
    );
    let action = detail(&results, "barrier_action");
    assert!(
        action.starts_with("refused:") && action.contains("Python code"),
        "{action}"
    );
}

#[test]
fn same_program_runs_on_cpython_server() {
    // The scenarios are CPython's behaviour: they all pass on its own server too.
    let key = "scenarios";
    let server = Py::run(SCENARIOS, &["serve", key]);
    let addr = server.expect("serving on");
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let results = run_scenarios(port, key);
    drop(server);
    assert_all_pass(&results);
    assert_eq!(detail(&results, "pool"), "served");
    assert_eq!(detail(&results, "barrier_action"), "served");
    let _ = LIMIT;
}

// ------------------------------------------------------------ Rust clients, named objects

fn producer(port: u16) {
    let m = multiprocess::managers::Manager::connect(format!("127.0.0.1:{port}"), "named").unwrap();
    let jobs: multiprocess::managers::QueueProxy<u64> = m.get("get_jobs").unwrap();
    for n in 1..=3 {
        jobs.put(n).unwrap();
    }
}

fn consumer(port: u16) {
    let m = multiprocess::managers::Manager::connect(format!("127.0.0.1:{port}"), "named").unwrap();
    let jobs: multiprocess::managers::QueueProxy<u64> = m.get("get_jobs").unwrap();
    let done: multiprocess::managers::DictProxy<u64, u64> = m.get("get_done").unwrap();
    for _ in 0..3 {
        let n = jobs.get_timeout(LIMIT).unwrap();
        done.insert(&n, &(n * n)).unwrap();
    }
}

#[test]
fn named_shared_objects_across_two_client_processes() {
    use multiprocess::managers::objects::{Dict, Queue};
    use multiprocess::managers::{DictProxy, Manager};
    use std::sync::Arc;
    let server = Server::builder("127.0.0.1:0")
        .authkey("named")
        .share("get_jobs", Arc::new(Queue::new(0)))
        .share("get_done", Arc::new(Dict::default()))
        .bind()
        .unwrap();
    let running = Running::serve(server);
    let port = running.port;
    // Two unrelated processes: each finds the objects by name, nothing is passed.
    let p = multiprocess::Process::new(producer, port);
    let c = multiprocess::Process::new(consumer, port);
    c.start().unwrap();
    p.start().unwrap();
    for child in [&p, &c] {
        child.join().unwrap();
        assert_eq!(child.exitcode(), Some(0));
    }
    let m = Manager::connect(format!("127.0.0.1:{port}"), "named").unwrap();
    let done: DictProxy<u64, u64> = m.get("get_done").unwrap();
    let mut items = done.items().unwrap();
    items.sort();
    assert_eq!(items, vec![(1, 1), (2, 4), (3, 9)]);
    drop(done);
    drop(m);
    running.stop();
}

#[test]
fn cpython_client_gets_the_shared_object_too() {
    use multiprocess::managers::objects::Queue;
    use multiprocess::managers::{Manager, QueueProxy};
    use std::sync::Arc;
    let server = Server::builder("127.0.0.1:0")
        .authkey("named")
        .share("get_queue", Arc::new(Queue::new(0)))
        .bind()
        .unwrap();
    let running = Running::serve(server);
    let port = running.port;
    // Python's documented remote pattern, client side.
    let py = Py::run(
        "import sys\n\
         from multiprocessing.managers import BaseManager\n\
         class QueueManager(BaseManager): pass\n\
         QueueManager.register('get_queue')\n\
         m = QueueManager(address=('127.0.0.1', int(sys.argv[1])), authkey=b'named')\n\
         m.connect()\n\
         m.get_queue().put('from python')\n\
         print('OK', flush=True)\n",
        &[&port.to_string()],
    );
    assert_eq!(py.line(), "OK");
    py.finish();
    let m = Manager::connect(format!("127.0.0.1:{port}"), "named").unwrap();
    let q: QueueProxy<String> = m.get("get_queue").unwrap();
    assert_eq!(q.get_timeout(LIMIT).unwrap(), "from python");
    drop(q);
    drop(m);
    running.stop();
}

#[test]
fn rust_proxies_inside_proxies_come_back_typed() {
    use multiprocess::managers::{ListProxy, Manager, QueueProxy};
    let manager = Manager::start().unwrap();
    let d = manager.dict::<String, QueueProxy<u64>>().unwrap();
    let q = manager.queue::<u64>().unwrap();
    d.insert(&"q".to_string(), &q).unwrap();
    drop(q);
    // Read twice: each read is a usable typed proxy with its own reference.
    d.get(&"q".to_string()).unwrap().unwrap().put(5).unwrap();
    let again = d.get(&"q".to_string()).unwrap().unwrap();
    assert_eq!(again.get_timeout(LIMIT).unwrap(), 5);
    // A list of lists, nested typed.
    let outer = manager.list::<ListProxy<i32>>().unwrap();
    for _ in 0..2 {
        let inner = manager.list::<i32>().unwrap();
        inner.push(&1).unwrap();
        outer.push(&inner).unwrap();
    }
    let first = outer.get(0).unwrap().unwrap();
    first.push(&2).unwrap();
    assert_eq!(outer.get(0).unwrap().unwrap().to_vec().unwrap(), vec![1, 2]);
    assert_eq!(outer.get(1).unwrap().unwrap().to_vec().unwrap(), vec![1]);
    manager.shutdown().unwrap();
}
