//! Pool behaviour with real worker processes: ordering, every crash kind under every start
//! method, timeouts, replacement, laziness, cancellation.
#![allow(unsafe_code)] // this test drives the OS directly (libc), as an attacker or a witness would

mod common;

use multiprocess::{Error, ExitStatus, Pool, StartMethod};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

fn square(x: i64) -> i64 {
    x * x
}

fn pid_of(_: u32) -> u32 {
    std::process::id()
}

#[test]
fn ordered_results_for_100k_items() {
    let pool = Pool::new(2).unwrap();
    let out = pool.map(square, 0..100_000i64).unwrap();
    assert_eq!(out.len(), 100_000);
    assert!(out
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (i as i64) * (i as i64)));
    assert_eq!(
        pool.map(square, Vec::<i64>::new()).unwrap(),
        Vec::<i64>::new()
    );
    let stats = pool.stats();
    assert_eq!(stats.tasks_completed, 100_000);
    assert_eq!(stats.workers.len(), 2);
    assert!(stats
        .workers
        .iter()
        .all(|w| w.alive && w.name.starts_with("PoolWorker-")));
}

/// Item behaviour by index: 13 panics, 17 aborts, 19 segfaults, 23 exits(3), 29 is
/// SIGKILLed; everything else squares.
fn crashy(i: u64) -> u64 {
    match i {
        13 => panic!("item 13 panics"),
        17 => std::process::abort(),
        19 => {
            // SAFETY: a write to a page mapped without access: a real SIGSEGV, on purpose.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                std::ptr::write_volatile(p.cast::<u8>(), 1);
            }
            0
        }
        23 => std::process::exit(3),
        29 => {
            // SAFETY: kill and getpid have no memory effects.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            0
        }
        i => i * i,
    }
}

each_method!(
    every_crash_kind_mid_map,
    every_crash_kind_with_chunk_size_one,
    pipelined_items_never_run_twice,
    maxtasksperchild_replaces_workers,
    initializer_state_is_visible
);

/// Every item of `crashy` over 0..40 has its value, or the typed error of its own crash.
fn check_crashy(m: StartMethod, results: &[Result<u64, Error>]) {
    assert_eq!(results.len(), 40);
    for (i, r) in results.iter().enumerate() {
        let i = i as u64;
        match (i, r) {
            (13, Err(Error::Panicked { message, location })) => {
                assert_eq!(message, "item 13 panics");
                assert!(location.starts_with("tests/pool.rs:"));
            }
            (
                17,
                Err(Error::WorkerDied {
                    status: ExitStatus::Signaled(libc::SIGABRT),
                    task: Some(17),
                    ..
                }),
            ) => {}
            (
                19,
                Err(Error::WorkerDied {
                    status: ExitStatus::Signaled(libc::SIGSEGV),
                    task: Some(19),
                    ..
                }),
            ) => {}
            (
                23,
                Err(Error::WorkerDied {
                    status: ExitStatus::Exited(3),
                    task: Some(23),
                    ..
                }),
            ) => {}
            (
                29,
                Err(Error::WorkerDied {
                    status: ExitStatus::Signaled(libc::SIGKILL),
                    task: Some(29),
                    ..
                }),
            ) => {}
            (i, Ok(v)) if ![13, 17, 19, 23, 29].contains(&i) => assert_eq!(*v, i * i),
            (i, other) => panic!("{m}: item {i}: unexpected {other:?}"),
        }
    }
}

/// With chunk size 1 (`imap`'s default) workers hold quick results back to send them
/// together; a worker that crashes holding some loses none of them: only the crashing
/// item fails, on one worker or two.
fn every_crash_kind_with_chunk_size_one(m: StartMethod) {
    for processes in [1, 2] {
        let pool = Pool::builder()
            .processes(processes)
            .start_method(m)
            .build()
            .unwrap();
        let results: Vec<Result<u64, Error>> = pool.imap(crashy, 0..40u64).unwrap().collect();
        check_crashy(m, &results);
        assert_eq!(pool.stats().workers_replaced, 4, "{m}, {processes} workers");
    }
}

fn every_crash_kind_mid_map(m: StartMethod) {
    let pool = Pool::builder()
        .processes(2)
        .start_method(m)
        .build()
        .unwrap();
    let results: Vec<Result<u64, Error>> =
        pool.imap_chunked(crashy, 0..40u64, 4).unwrap().collect();
    check_crashy(m, &results);
    let stats = pool.stats();
    assert_eq!(
        stats.workers_replaced, 4,
        "{m}: one replacement per dead worker"
    );
    // map reports the first failure in item order.
    match pool.map_chunked(crashy, 10..20u64, 2) {
        Err(Error::Panicked { message, .. }) => assert_eq!(message, "item 13 panics"),
        other => panic!("{m}: {other:?}"),
    }
    // The pool still works.
    assert_eq!(pool.map(square, [1, 2, 3]).unwrap(), vec![1, 4, 9]);
}

/// Logs that item `i` ran (one line appended to the file at `log`), then runs it.
fn crashy_logged(i: u64, log: String) -> u64 {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    // One write per line: O_APPEND writes from several processes do not interleave.
    f.write_all(format!("{i}\n").as_bytes()).unwrap();
    drop(f);
    crashy(i)
}

/// With chunk size 1 (imap's default) a worker has many items in flight at once, and holds
/// back the results of quick ones to send them together: a worker that dies fails the
/// item it ran, and every item runs exactly once: none that finished runs again (one
/// whose result had not left the dead worker fails with `WorkerDied` naming it), none
/// that was waiting behind the dead one is lost.
fn pipelined_items_never_run_twice(m: StartMethod) {
    let dir = std::env::temp_dir().join(format!("mp-pipelined-{}-{m}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("ran");
    std::fs::write(&log, b"").unwrap();
    let pool = Pool::builder()
        .processes(2)
        .start_method(m)
        .build()
        .unwrap();
    let path = log.to_string_lossy().into_owned();
    let n = 400u64;
    let results: Vec<Result<u64, Error>> = pool
        .imap(crashy_logged, (0..n).map(move |i| (i, path.clone())))
        .unwrap()
        .collect();
    assert_eq!(results.len(), n as usize);
    for (i, r) in results.iter().enumerate() {
        let i = i as u64;
        match r {
            Ok(v) => assert_eq!(*v, i * i, "{m}: item {i}"),
            Err(Error::Panicked { .. }) => assert_eq!(i, 13, "{m}"),
            Err(Error::WorkerDied { task, .. }) => assert_eq!(*task, Some(i), "{m}"),
            Err(e) => panic!("{m}: item {i}: {e:?}"),
        }
    }
    for i in [13, 17, 19, 23, 29] {
        assert!(results[i].is_err(), "{m}: item {i}: {:?}", results[i]);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let mut runs = vec![0u32; n as usize];
    for line in text.lines() {
        runs[line.parse::<usize>().unwrap()] += 1;
    }
    for (i, k) in runs.iter().enumerate() {
        assert_eq!(*k, 1, "{m}: item {i} ran {k} times");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn maxtasksperchild_replaces_workers(m: StartMethod) {
    let pool = Pool::builder()
        .processes(2)
        .maxtasksperchild(2)
        .start_method(m)
        .build()
        .unwrap();
    let pids: BTreeSet<u32> = pool
        .map_chunked(pid_of, 0..20u32, 1)
        .unwrap()
        .into_iter()
        .collect();
    // 20 tasks, at most 2 per worker: at least 10 distinct workers.
    assert!(
        pids.len() >= 10,
        "{m}: only {} distinct workers",
        pids.len()
    );
}

static SEED: OnceLock<u64> = OnceLock::new();

fn set_seed(v: u64) {
    SEED.set(v).unwrap();
}

fn read_seed(x: u64) -> u64 {
    SEED.get().copied().unwrap_or(0) + x
}

fn initializer_state_is_visible(m: StartMethod) {
    let pool = Pool::builder()
        .processes(2)
        .maxtasksperchild(1)
        .initializer(set_seed, 1000u64)
        .start_method(m)
        .build()
        .unwrap();
    // Replacement workers run the initializer too.
    let out = pool.map_chunked(read_seed, 0..6u64, 1).unwrap();
    assert_eq!(out, vec![1000, 1001, 1002, 1003, 1004, 1005]);
}

fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[test]
fn timeouts_kill_and_replace() {
    let pool = Pool::builder()
        .processes(2)
        .timeout(Duration::from_millis(300))
        .grace(Duration::from_millis(200))
        .build()
        .unwrap();
    let t = Instant::now();
    let results: Vec<Result<u64, Error>> = pool.imap(nap, [5, 60_000, 5, 6]).unwrap().collect();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(results[0], Ok(5)));
    assert!(
        matches!(results[1], Err(Error::Timeout { .. })),
        "{:?}",
        results[1]
    );
    assert!(matches!(results[2], Ok(5)));
    assert!(matches!(results[3], Ok(6)));
    assert!(pool.stats().workers_replaced >= 1);
}

#[test]
fn terminate_stops_a_long_map_quickly() {
    let pool = Pool::new(2).unwrap();
    let pending = pool.map_async(nap, vec![60_000u64; 4]).unwrap();
    // Wait until the workers are really running (both busy).
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().workers.iter().filter(|w| w.alive).count() < 2 && Instant::now() < deadline {
        std::thread::yield_now();
    }
    let t = Instant::now();
    pool.terminate();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "terminate took {:?}",
        t.elapsed()
    );
    assert!(matches!(pending.get(), Err(Error::Cancelled)));
    assert!(pool.stats().workers.iter().all(|w| !w.alive));
    assert!(
        pool.apply(square, 2).is_err(),
        "a terminated pool takes no work"
    );
}

#[test]
fn lazy_imap_over_endless_input_stays_bounded() {
    let pool = Pool::new(2).unwrap();
    let pulled = Arc::new(AtomicU64::new(0));
    let p2 = pulled.clone();
    let input = (0u64..).inspect(move |_| {
        p2.fetch_add(1, Ordering::SeqCst);
    });
    let mut it = pool.imap_chunked(square_u, input, 8).unwrap();
    for i in 0..5_000u64 {
        assert_eq!(it.next().unwrap().unwrap(), i * i);
    }
    let ahead = pulled.load(Ordering::SeqCst) - 5_000;
    assert!(
        ahead <= 2 * 4 * 8 + 8,
        "imap pulled {ahead} items ahead of the consumer"
    );
    drop(it);
    // The pool is usable after abandoning an endless iterator.
    assert_eq!(pool.apply(square, 3).unwrap(), 9);
}

fn square_u(x: u64) -> u64 {
    x * x
}

#[test]
fn imap_unordered_yields_everything() {
    let pool = Pool::new(2).unwrap();
    let mut got: Vec<u64> = pool
        .imap_unordered_chunked(square_u, 0..1000u64, 7)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    got.sort();
    assert_eq!(got, (0..1000u64).map(|x| x * x).collect::<Vec<_>>());
}

fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[test]
fn starmap_apply_and_async() {
    let pool = Pool::new(2).unwrap();
    assert_eq!(
        pool.starmap(add, vec![(1, 2), (3, 4), (5, 6)]).unwrap(),
        vec![3, 7, 11]
    );
    assert_eq!(pool.apply(add, (20, 22)).unwrap(), 42);
    let a = pool.apply_async(square, 7).unwrap();
    let b = pool.starmap_async(add, vec![(1, 1)]).unwrap();
    assert_eq!(a.get().unwrap(), 49);
    let mut b = b;
    assert_eq!(b.get_timeout(Duration::from_secs(30)).unwrap(), vec![2]);
    let mut slow = pool.apply_async(nap, 2_000).unwrap();
    assert!(matches!(
        slow.get_timeout(Duration::from_millis(10)),
        Err(Error::Timeout { .. })
    ));
    assert!(!slow.ready());
    assert_eq!(slow.successful(), None);
    assert!(slow.wait_timeout(Duration::from_secs(30)));
    assert_eq!(slow.successful(), Some(true));
    assert_eq!(slow.get().unwrap(), 2_000);
}

struct Unpark(std::thread::Thread);
impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_secs(1));
    }
}

#[test]
fn async_result_is_a_future() {
    let pool = Pool::new(2).unwrap();
    let r = pool.apply_async(nap, 50).unwrap();
    assert_eq!(block_on(r).unwrap(), 50);
    let all = pool.map_async(square, 0..10).unwrap();
    assert_eq!(block_on(all).unwrap()[9], 81);
}

#[test]
fn cancel_kills_the_running_task() {
    let pool = Pool::new(1).unwrap();
    let r = pool.apply_async(nap, 60_000).unwrap();
    while pool.stats().workers.is_empty() {
        std::thread::yield_now();
    }
    let t = Instant::now();
    r.cancel();
    assert!(matches!(r.get(), Err(Error::Cancelled)));
    assert!(t.elapsed() < Duration::from_secs(5));
    // The worker running it was replaced; the pool goes on.
    assert_eq!(pool.apply(square, 5).unwrap(), 25);
}

/// Crashes on the first try only (a marker file remembers the first try).
fn flaky(path: String) -> u32 {
    if std::fs::metadata(&path).is_err() {
        std::fs::write(&path, b"tried").unwrap();
        std::process::abort();
    }
    7
}

#[test]
fn retries_rerun_items_whose_worker_died() {
    let dir = std::env::temp_dir().join(format!("mp-retry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = |n: u32| dir.join(format!("m{n}")).to_string_lossy().into_owned();
    let pool = Pool::builder().processes(2).retries(1).build().unwrap();
    assert_eq!(pool.apply(flaky, marker(1)).unwrap(), 7);
    let no_retry = Pool::new(1).unwrap();
    assert!(matches!(
        no_retry.apply(flaky, marker(2)),
        Err(Error::WorkerDied { task: Some(0), .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn close_join_and_drop() {
    let pool = Pool::new(2).unwrap();
    assert!(pool.join().is_err(), "join needs close first");
    let pending = pool.map_async(nap, [20u64, 20, 20]).unwrap();
    pool.close();
    assert!(
        matches!(pool.apply(square, 1), Err(Error::Process(_))),
        "closed pool refuses work"
    );
    pool.join().unwrap();
    assert_eq!(
        pending.get().unwrap(),
        vec![20, 20, 20],
        "close lets queued work finish"
    );

    let pool = Pool::new(1).unwrap();
    let pending = pool.apply_async(nap, 60_000).unwrap();
    let t = Instant::now();
    drop(pool);
    assert!(
        matches!(pending.get(), Err(Error::Cancelled)),
        "dropping a pool cancels, never hangs"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

fn touch_worker_name(_: u8) -> String {
    multiprocess::current_process().name().to_string()
}

#[test]
fn workers_are_named_and_daemonic() {
    let pool = Pool::new(2).unwrap();
    let names: BTreeSet<String> = pool
        .map_chunked(touch_worker_name, [0u8; 16], 1)
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n == "PoolWorker-1" || n == "PoolWorker-2"),
        "{names:?}"
    );
}

/// Run by `ctrl_c_ends_the_tree_quietly` in its own process group.
#[test]
#[ignore = "helper, run by another test"]
fn helper_pool_waiting_for_ctrl_c() {
    if std::env::var("MP_CTRL_C_HELPER").is_err() {
        return;
    }
    let pool = Pool::new(2).unwrap();
    let pending = pool.map_async(nap, vec![600_000u64; 2]).unwrap();
    let pids: Vec<String> = pool
        .stats()
        .workers
        .iter()
        .map(|w| w.pid.to_string())
        .collect();
    println!("WORKERS {}", pids.join(" "));
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    let _ = pending.get();
}

#[test]
fn ctrl_c_ends_the_tree_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_pool_waiting_for_ctrl_c",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MP_CTRL_C_HELPER", "1")
        .env_remove("RUST_BACKTRACE")
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("WORKERS ") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "helper ended before reporting its workers"
        );
    }
    let workers: Vec<u32> = line[line.find("WORKERS ").unwrap() + 8..]
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(workers.len(), 2);
    let t = Instant::now();
    // What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
    // SAFETY: killpg has no memory effects.
    unsafe { libc::killpg(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGINT));
    for pid in workers {
        let gone = (|| {
            while t.elapsed() < Duration::from_secs(1) {
                // Ended: no entry any more, or a zombie waiting for init to reap it.
                match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    Err(_) => return true,
                    Ok(stat)
                        if stat
                            .rsplit(") ")
                            .next()
                            .is_some_and(|rest| rest.starts_with('Z')) =>
                    {
                        return true
                    }
                    Ok(_) => {}
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        })();
        assert!(gone, "worker {pid} outlived Ctrl-C by more than a second");
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !err.contains("panicked") && !err.contains("Error"),
        "Ctrl-C was not quiet: {err}"
    );
}

fn hog(mib: usize) -> usize {
    // Touch every page so that it is really resident; hold it for a while.
    let v = vec![1u8; mib << 20];
    std::thread::sleep(Duration::from_millis(300));
    // Read every page back (zero of them are 0), so the memory cannot be optimised away.
    mib + v.iter().step_by(4096).filter(|&&b| b == 0).count()
}

#[test]
fn memory_limit_fails_the_task_not_the_machine() {
    let pool = Pool::builder()
        .processes(2)
        .memory_limit(96 << 20)
        .build()
        .unwrap();
    let results: Vec<Result<usize, Error>> = pool.imap(hog, [1usize, 400, 2]).unwrap().collect();
    assert!(results[0].is_ok(), "{:?}", results[0]);
    match &results[1] {
        Err(Error::MemoryLimit {
            task: Some(1),
            limit,
            used,
        }) => {
            assert_eq!(*limit, 96 << 20);
            assert!(*used > *limit);
        }
        other => panic!("expected MemoryLimit, got {other:?}"),
    }
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert!(pool.stats().workers_replaced >= 1);
}

/// Blocks until something is written to the FIFO at `path` (a real event, no timing).
fn wait_for_fifo(path: String) -> usize {
    let mut buf = [0u8; 8];
    let mut f = std::fs::File::open(&path).unwrap();
    std::io::Read::read(&mut f, &mut buf).unwrap()
}

/// Worker 1 does not finish starting until its FIFO is opened for writing.
fn second_worker_waits(path: String) {
    if multiprocess::pool::worker_id() == Some(1) {
        wait_for_fifo(path);
    }
}

fn echo(x: u64) -> u64 {
    x
}

fn fifo(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("mp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    path
}

#[test]
fn a_short_call_never_waits_behind_a_blocked_one_while_a_worker_starts() {
    let (gate, start) = (fifo("gate"), fifo("start"));
    let pool = Pool::builder()
        .processes(2)
        .initializer(second_worker_waits, start.to_string_lossy().into_owned())
        .build()
        .unwrap();
    let mut blocked = pool
        .apply_async(wait_for_fifo, gate.to_string_lossy().into_owned())
        .unwrap();
    let mut short = pool.apply_async(echo, 7).unwrap();
    // Opening for writing returns once the blocked call has opened the gate to read: it
    // runs on worker 0 while worker 1 is still in its initializer.
    let mut gate_w = std::fs::OpenOptions::new().write(true).open(&gate).unwrap();
    let mut start_w = std::fs::OpenOptions::new()
        .write(true)
        .open(&start)
        .unwrap();
    std::io::Write::write_all(&mut start_w, b"go").unwrap();
    // The short call went to worker 1 once it was ready, not behind the blocked one.
    assert_eq!(short.get_timeout(Duration::from_secs(10)).unwrap(), 7);
    std::io::Write::write_all(&mut gate_w, b"go").unwrap();
    assert_eq!(blocked.get_timeout(Duration::from_secs(10)).unwrap(), 2);
    drop((gate_w, start_w));
    std::fs::remove_file(&gate).unwrap();
    std::fs::remove_file(&start).unwrap();
}

/// Item 1 blocks until its FIFO is written; any other item is returned as it is.
fn echo_or_wait((x, gate): (u64, String)) -> u64 {
    if x == 1 {
        wait_for_fifo(gate) as u64
    } else {
        x
    }
}

/// A worker holds back a quick item's result while its next item already waits in its
/// socket, but never longer than a moment: the result of item 0 arrives while item 1,
/// sent to the same (only) worker with it, is still blocked.
#[test]
fn a_quick_result_is_not_held_behind_a_blocked_item() {
    let gate = fifo("held");
    let pool = Pool::new(1).unwrap();
    let path = gate.to_string_lossy().into_owned();
    let mut it = pool
        .imap(
            echo_or_wait,
            vec![(0, path.clone()), (1, path), (2, String::new())],
        )
        .unwrap();
    let first = it.next_timeout(Duration::from_secs(10));
    // Opening for writing returns once item 1 has opened the gate to read.
    let mut gate_w = std::fs::OpenOptions::new().write(true).open(&gate).unwrap();
    assert_eq!(
        first.map(|r| r.unwrap()),
        Some(0),
        "item 0 held behind item 1"
    );
    std::io::Write::write_all(&mut gate_w, b"go").unwrap();
    let rest: Vec<u64> = it.map(|r| r.unwrap()).collect();
    assert_eq!(rest, vec![2, 2]);
    drop(gate_w);
    std::fs::remove_file(&gate).unwrap();
}

/// Appends `i` to the log at `log` (one write), then squares it.
fn logged_square((i, log): (u64, String)) -> u64 {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(format!("{i}\n").as_bytes()).unwrap();
    i * i
}

/// Workers killed from outside (SIGKILL) in the middle of an `imap` of quick items, whose
/// results they batch: every item yields its value once, or `WorkerDied` naming it; no
/// item runs twice, and every item that yields a value ran.
#[test]
fn killed_workers_lose_no_batched_result_and_rerun_none() {
    let dir = std::env::temp_dir().join(format!("mp-batched-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("ran");
    std::fs::write(&log, b"").unwrap();
    let pool = Pool::new(2).unwrap();
    let path = log.to_string_lossy().into_owned();
    let n = 20_000u64;
    let mut it = pool
        .imap(logged_square, (0..n).map(move |i| (i, path.clone())))
        .unwrap();
    let mut results = Vec::new();
    let mut killed = BTreeSet::new();
    while let Some(r) = it.next_timeout(common::LONG) {
        results.push(r);
        // Kill a live worker every 2000 items, while items are in flight.
        if results.len() % 2000 == 1000 {
            let victim = pool
                .stats()
                .workers
                .iter()
                .find(|w| w.alive && !killed.contains(&w.pid))
                .map(|w| w.pid);
            if let Some(pid) = victim {
                // SAFETY: kill has no memory effects; the pid is a live child of ours.
                assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
                killed.insert(pid);
            }
        }
    }
    assert_eq!(results.len(), n as usize);
    assert!(killed.len() >= 5, "killed {}", killed.len());
    let text = std::fs::read_to_string(&log).unwrap();
    let mut runs = vec![0u32; n as usize];
    for line in text.lines() {
        runs[line.parse::<usize>().unwrap()] += 1;
    }
    let mut lost = 0;
    for (i, r) in results.iter().enumerate() {
        let i = i as u64;
        match r {
            Ok(v) => {
                assert_eq!(*v, i * i, "item {i}");
                assert_eq!(
                    runs[i as usize], 1,
                    "item {i} ran {} times",
                    runs[i as usize]
                );
            }
            Err(Error::WorkerDied { task, status, .. }) => {
                assert_eq!(*task, Some(i));
                assert_eq!(*status, ExitStatus::Signaled(libc::SIGKILL));
                assert!(
                    runs[i as usize] <= 1,
                    "item {i} ran {} times",
                    runs[i as usize]
                );
                lost += 1;
            }
            Err(e) => panic!("item {i}: {e:?}"),
        }
    }
    // One item per killed worker at most: the one it was running, or the one it had
    // just finished and not yet kept in its outbox. Held results are recovered.
    assert!(
        lost <= killed.len(),
        "{lost} items failed, {} kills",
        killed.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn checksum(buf: Vec<u8>) -> (usize, u64) {
    (buf.len(), buf.iter().map(|&b| b as u64).sum())
}

fn add_pair(a: i64, b: i64) -> i64 {
    a + b
}

#[test]
fn inputs_by_reference_in_every_form() {
    let pool = Pool::new(2).unwrap();
    // Four 1 MiB buffers and an empty one, lent by reference: the batch stays ours.
    let bufs: Vec<Vec<u8>> = (0..5u8)
        .map(|i| {
            if i == 4 {
                Vec::new()
            } else {
                vec![i + 1; 1 << 20]
            }
        })
        .collect();
    let want: Vec<(usize, u64)> = bufs
        .iter()
        .map(|b| (b.len(), b.iter().map(|&x| x as u64).sum()))
        .collect();
    assert_eq!(pool.map(checksum, &bufs).unwrap(), want);
    assert_eq!(pool.map(checksum, bufs.as_slice()).unwrap(), want);
    assert_eq!(pool.map_chunked(checksum, bufs.iter(), 2).unwrap(), want);
    assert_eq!(
        pool.map_async(checksum, bufs.iter().rev())
            .unwrap()
            .get()
            .unwrap(),
        want.iter().rev().copied().collect::<Vec<_>>()
    );
    // The borrow may end as soon as the async call returns: the input is encoded by then.
    let r = {
        let lent = bufs.clone();
        pool.map_async_chunked(checksum, &lent, 1).unwrap()
    };
    assert_eq!(r.get().unwrap(), want);
    // starmap over borrowed tuples.
    let pairs = vec![(1i64, 2i64), (3, 4), (5, 6)];
    assert_eq!(pool.starmap(add_pair, &pairs).unwrap(), [3, 7, 11]);
    assert_eq!(
        pool.starmap_async(add_pair, pairs.iter())
            .unwrap()
            .get()
            .unwrap(),
        [3, 7, 11]
    );
    // imap takes items that own what they lend ('static): Arc and Box.
    let shared: Vec<Arc<Vec<u8>>> = bufs.iter().cloned().map(Arc::new).collect();
    let got: Vec<(usize, u64)> = pool
        .imap(checksum, shared.clone())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got, want);
    let mut got: Vec<(usize, u64)> = pool
        .imap_unordered_chunked(checksum, bufs.clone().into_iter().map(Box::new), 2)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    got.sort();
    let mut sorted = want.clone();
    sorted.sort();
    assert_eq!(got, sorted);
    // Owned items still work as they did.
    assert_eq!(pool.map(checksum, bufs).unwrap(), want);
}

/// An argument that refuses to be encoded when it is 13.
#[derive(serde::Deserialize)]
struct Picky(u64);

impl serde::Serialize for Picky {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == 13 {
            return Err(serde::ser::Error::custom("13 refuses to be encoded"));
        }
        s.serialize_u64(self.0)
    }
}

fn unpick(p: Picky) -> u64 {
    p.0 * 2
}

/// An item that cannot be encoded, in the middle of an input of many chunks (encoded by
/// the caller while the pool already runs the first ones): the call fails with that
/// item's error, the items after it still run, and the pool goes on.
#[test]
fn an_item_that_cannot_be_encoded_fails_the_call_mid_input() {
    let pool = Pool::new(2).unwrap();
    let picky: Vec<Picky> = (0..100).map(Picky).collect();
    match pool.map_chunked(unpick, &picky, 10) {
        Err(Error::Serialization(m)) => assert!(m.contains("13 refuses"), "{m}"),
        other => panic!("{other:?}"),
    }
    let got: Vec<Result<u64, Error>> = pool
        .imap_chunked(unpick, (0..100).map(Picky), 10)
        .unwrap()
        .collect();
    for (i, r) in got.iter().enumerate() {
        match r {
            Ok(v) => assert_eq!(*v, i as u64 * 2),
            Err(Error::Serialization(_)) => assert!((10..20).contains(&i), "item {i}"),
            Err(e) => panic!("item {i}: {e:?}"),
        }
    }
    assert!(matches!(got[13], Err(Error::Serialization(_))));
    let fine: Vec<Picky> = (20..30).map(Picky).collect();
    assert_eq!(
        pool.map(unpick, &fine).unwrap(),
        (20..30).map(|i| i * 2).collect::<Vec<_>>()
    );
}

/// An argument whose `Serialize` panics when it is 13.
#[derive(serde::Deserialize)]
struct Panicky(u64);

impl serde::Serialize for Panicky {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        assert_ne!(self.0, 13, "13 panics while encoded");
        s.serialize_u64(self.0)
    }
}

fn unpanic(p: Panicky) -> u64 {
    p.0
}

/// A panic in an item's `Serialize`, in the caller's thread while the pool already runs
/// the first chunks, unwinds out of `map`; the job it left behind ends, so that `close`
/// and `join` return and the pool's other work is not held up.
#[test]
fn a_panic_while_encoding_leaves_no_job_waiting() {
    let pool = Arc::new(Pool::new(2).unwrap());
    let p = pool.clone();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        p.map_chunked(unpanic, (0..100).map(Panicky), 10)
    }));
    assert!(caught.is_err(), "the panic reaches the caller");
    assert_eq!(
        pool.map(unpanic, (0..5).map(Panicky)).unwrap(),
        vec![0, 1, 2, 3, 4]
    );
    pool.close();
    let (tx, rx) = std::sync::mpsc::channel();
    let p = pool.clone();
    std::thread::spawn(move || tx.send(p.join()).unwrap());
    let joined = rx.recv_timeout(common::LONG).expect("join returned");
    assert!(joined.is_ok(), "{joined:?}");
}

/// A result whose `Deserialize` panics when it is 7 (the parent decodes `imap` results on
/// the pool's own thread).
#[derive(serde::Serialize, Debug, PartialEq)]
struct Touchy(u64);

impl<'de> serde::Deserialize<'de> for Touchy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        assert_ne!(v, 7, "7 panics while decoded");
        Ok(Touchy(v))
    }
}

fn touchy(x: u64) -> Touchy {
    Touchy(x)
}

/// The caller's code that a lazy `imap` runs on the pool's own thread (its input iterator,
/// its results' `Deserialize`) may panic: that call gets the error where it happened and
/// the pool goes on (it used to lose its dispatcher, and every later call hung).
#[test]
fn panics_in_an_imap_input_or_result_decode_fail_that_call_only() {
    let pool = Pool::new(2).unwrap();
    let input = (0..100u64).inspect(|&i| assert_ne!(i, 50, "the input panics at 50"));
    let got: Vec<Result<u64, Error>> = pool.imap(square_u, input).unwrap().collect();
    assert_eq!(got.len(), 51, "{:?}", got.last());
    for (i, r) in got[..50].iter().enumerate() {
        assert_eq!(r.as_ref().unwrap(), &((i * i) as u64));
    }
    match &got[50] {
        Err(Error::Panicked { message, .. }) => {
            assert!(message.contains("the input panics at 50"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let got: Vec<Result<Touchy, Error>> = pool.imap(touchy, 0..10u64).unwrap().collect();
    assert_eq!(got.len(), 10);
    for (i, r) in got.iter().enumerate() {
        match r {
            Ok(t) => assert_eq!(t, &Touchy(i as u64)),
            Err(Error::Serialization(m)) => {
                assert_eq!(i, 7);
                assert!(m.contains("7 panics while decoded"), "{m}");
            }
            Err(e) => panic!("item {i}: {e:?}"),
        }
    }
    assert!(got[7].is_err());
    assert_eq!(pool.map(square, [1, 2, 3]).unwrap(), vec![1, 4, 9]);
}
