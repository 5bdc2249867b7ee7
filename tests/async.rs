//! The async forms, awaited under real runtimes (tokio current-thread and multi-thread,
//! `futures::executor`, smol) against real children: while a future waits, the thread
//! that polls it keeps running other tasks.
#![allow(unsafe_code)] // this test sends signals (libc) as a witness would

mod common;

use common::{joined, Reaper, LONG};

use multiprocess::{get_context, pipe, Connection, Error, Queue, StartMethod};
use std::future::Future;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long the children below make the parent wait.
const PAUSE: Duration = Duration::from_millis(400);

/// Runs `fut` on a single-threaded tokio runtime beside a task that ticks every 10 ms, and
/// returns its output with the number of ticks seen while it was awaited. A future that
/// blocked the thread would leave the ticker stuck.
fn with_ticker<F: Future>(fut: F) -> (F::Output, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let ticks = Arc::new(AtomicU64::new(0));
    let t = ticks.clone();
    rt.block_on(async move {
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(10));
            loop {
                every.tick().await;
                t.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Let the ticker start before the wait begins.
        tokio::task::yield_now().await;
        let before = ticks.load(Ordering::Relaxed);
        let out = tokio::time::timeout(LONG, fut)
            .await
            .expect("the future did not finish in time");
        let seen = ticks.load(Ordering::Relaxed) - before;
        ticker.abort();
        (out, seen)
    })
}

/// Awaits `fut` for at most `limit` on a single-threaded tokio runtime; `None` if it was
/// not ready by then (the future is dropped).
fn within<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async { tokio::time::timeout(limit, fut).await.ok() })
}

/// The fewest ticks a wait of about `PAUSE` must let through (half, for a loaded machine).
fn enough_ticks() -> u64 {
    (PAUSE.as_millis() / 10 / 2) as u64
}

fn nap_then_exit() {
    std::thread::sleep(PAUSE);
}

fn nap_then_square(x: u64) -> u64 {
    std::thread::sleep(PAUSE);
    x * x
}

fn nap_then_put(q: Queue<String>) {
    std::thread::sleep(PAUSE);
    q.put("late".to_string()).unwrap();
}

fn nap_then_send(c: Connection) {
    std::thread::sleep(PAUSE);
    c.send(&(7u32, "seven".to_string())).unwrap();
}

fn join_async_keeps_the_thread_free(m: StartMethod) {
    let p = Reaper(get_context(m).process(nap_then_exit, ()));
    p.0.start().unwrap();
    let (res, ticks) = with_ticker(p.0.join_async());
    res.unwrap();
    assert_eq!(p.0.exitcode(), Some(0));
    assert!(ticks >= enough_ticks(), "only {ticks} ticks while joining");
}

fn join_handle_is_a_future(m: StartMethod) {
    let h = get_context(m)
        .builder()
        .spawn(nap_then_square, 12u64)
        .unwrap();
    let (res, ticks) = with_ticker(h);
    assert_eq!(res.unwrap(), 144);
    assert!(ticks >= enough_ticks(), "only {ticks} ticks while awaiting");
}

fn queue_get_async_keeps_the_thread_free(m: StartMethod) {
    let q: Queue<String> = Queue::new().unwrap();
    let p = Reaper(get_context(m).process(nap_then_put, q.clone()));
    p.0.start().unwrap();
    let (res, ticks) = with_ticker(q.get_async());
    assert_eq!(res.unwrap(), "late");
    assert!(ticks >= enough_ticks(), "only {ticks} ticks while getting");
    assert_eq!(joined(&p.0), 0);
}

fn connection_recv_async_keeps_the_thread_free(m: StartMethod) {
    let (ours, theirs) = pipe().unwrap();
    let p = Reaper(get_context(m).process(nap_then_send, theirs));
    p.0.start().unwrap();
    let (res, ticks) = with_ticker(ours.recv_async::<(u32, String)>());
    assert_eq!(res.unwrap(), (7, "seven".to_string()));
    assert!(
        ticks >= enough_ticks(),
        "only {ticks} ticks while receiving"
    );
    assert_eq!(joined(&p.0), 0);
}

/// The same waits under `futures::executor`, smol and a multi-threaded tokio runtime.
fn other_runtimes(m: StartMethod) {
    let q: Queue<String> = Queue::new().unwrap();
    let p = Reaper(get_context(m).process(nap_then_put, q.clone()));
    p.0.start().unwrap();
    assert_eq!(futures::executor::block_on(q.get_async()).unwrap(), "late");
    futures::executor::block_on(p.0.join_async()).unwrap();

    let (ours, theirs) = pipe().unwrap();
    let p = Reaper(get_context(m).process(nap_then_send, theirs));
    p.0.start().unwrap();
    let got = smol::block_on(ours.recv_async::<(u32, String)>()).unwrap();
    assert_eq!(got.0, 7);
    smol::block_on(p.0.join_async()).unwrap();

    let h = get_context(m)
        .builder()
        .spawn(nap_then_square, 3u64)
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    assert_eq!(rt.block_on(h).unwrap(), 9);
}

each_method!(
    join_async_keeps_the_thread_free,
    join_handle_is_a_future,
    queue_get_async_keeps_the_thread_free,
    connection_recv_async_keeps_the_thread_free,
    other_runtimes,
);

#[test]
fn a_dropped_get_async_loses_no_item() {
    let q: Queue<u32> = Queue::new().unwrap();
    // A wait that gives up (the future is dropped while registered)...
    let r = within(Duration::from_millis(50), q.get_async());
    assert!(r.is_none(), "nothing was put, the wait must time out");
    // ...takes nothing put afterwards.
    q.put(1).unwrap();
    q.put(2).unwrap();
    assert_eq!(q.get_timeout(LONG).unwrap(), 1);
    // A future polled once, then dropped when an item is there, took nothing either.
    let mut fut = Box::pin(q.get_async());
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_ready());
    drop(fut);
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    let fut = q.get_async();
    q.put(3).unwrap();
    drop(fut);
    assert_eq!(q.get_timeout(LONG).unwrap(), 3);
}

#[test]
fn put_async_waits_for_room_and_a_dropped_one_puts_nothing() {
    let q: Queue<u32> = Queue::with_maxsize(1).unwrap();
    q.put(1).unwrap();
    let r = within(Duration::from_millis(50), q.put_async(2));
    assert!(r.is_none(), "the queue is full, the put must wait");
    assert_eq!(q.qsize(), 1);
    // A consumer frees room from another thread: the waiting put goes in.
    let q2 = q.clone();
    let taker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        q2.get_timeout(LONG).unwrap()
    });
    within(LONG, q.put_async(3)).unwrap().unwrap();
    assert_eq!(taker.join().unwrap(), 1);
    assert_eq!(q.get_timeout(LONG).unwrap(), 3);
}

#[test]
fn a_dropped_recv_async_keeps_the_part_of_a_frame_that_arrived() {
    let (raw, ours) = UnixStream::pair().unwrap();
    let ours = Connection::from(ours);
    let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    let (first, rest) = frame.split_at(100_003);
    let mut raw2 = raw.try_clone().unwrap();
    raw2.write_all(first).unwrap();
    let r = within(Duration::from_millis(100), ours.recv_bytes_async());
    assert!(r.is_none(), "half a frame is not a message");
    raw2.write_all(rest).unwrap();
    raw2.write_all(&[0, 0, 0, 2, b'o', b'k']).unwrap();
    assert_eq!(ours.recv_bytes().unwrap(), payload);
    let next = within(LONG, ours.recv_bytes_async());
    assert_eq!(next.unwrap().unwrap(), b"ok");
}

#[test]
fn a_dropped_send_async_still_delivers_its_whole_frame() {
    let (a, b) = pipe().unwrap();
    let big = vec![7u64; 4 << 20]; // 32 MiB: more than the socket takes at once
    let r = within(Duration::from_millis(100), a.send_async(&big));
    assert!(r.is_none(), "nobody reads, the send must wait");
    let reader = std::thread::spawn(move || {
        let first: Vec<u64> = b.recv().unwrap();
        let second: String = b.recv().unwrap();
        (first.len(), second)
    });
    // The next message goes out after the rest of the dropped one.
    a.send("after").unwrap();
    assert_eq!(reader.join().unwrap(), (4 << 20, "after".to_string()));
}

#[test]
fn send_async_then_recv_async_on_one_thread() {
    let (a, b) = pipe().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let big = vec![1u32; 1 << 20];
    let got: Vec<u32> = rt.block_on(async {
        let send = a.send_async(&big);
        let recv = b.recv_async::<Vec<u32>>();
        let (s, r) = tokio::join!(send, recv);
        s.unwrap();
        r.unwrap()
    });
    assert_eq!(got, big);
}

// ---------------------------------------------------------------------- pools

use futures::StreamExt;
use multiprocess::pool::{as_completed, worker_id};
use multiprocess::Pool;

fn pool(m: StartMethod, n: usize) -> Pool {
    Pool::builder()
        .processes(n)
        .start_method(m)
        .build()
        .unwrap()
}

fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn imap_stream_and_async_result_keep_the_thread_free(m: StartMethod) {
    let pool = pool(m, 2);
    let stream = pool.imap(nap, [PAUSE.as_millis() as u64, 10, 20]).unwrap();
    // With `StreamExt` in scope, `IMap`'s adapters are named by trait (it is an Iterator too).
    let (got, ticks) = with_ticker(StreamExt::collect::<Vec<_>>(StreamExt::map(stream, |r| {
        r.unwrap()
    })));
    assert_eq!(got, [PAUSE.as_millis() as u64, 10, 20]);
    assert!(
        ticks >= enough_ticks(),
        "only {ticks} ticks while streaming"
    );

    let r = pool.apply_async(nap, PAUSE.as_millis() as u64).unwrap();
    let (got, ticks) = with_ticker(async { tokio::time::timeout(LONG, r).await });
    assert_eq!(got.unwrap().unwrap(), PAUSE.as_millis() as u64);
    assert!(ticks >= enough_ticks(), "only {ticks} ticks while awaiting");
}

fn as_completed_gives_completion_order(m: StartMethod) {
    let pool = pool(m, 3);
    // Every worker ready, so that each call gets a worker of its own.
    pool.map_chunked(nap, [50, 50, 50], 1).unwrap();
    let calls = [900, 10, 450].map(|ms| pool.apply_async(nap, ms).unwrap());
    let order: Vec<(usize, u64)> =
        Iterator::map(as_completed(calls), |(i, r)| (i, r.unwrap())).collect();
    assert_eq!(order, [(1, 10), (2, 450), (0, 900)]);
    // The same as a Stream.
    let calls = [900, 10, 450].map(|ms| pool.apply_async(nap, ms).unwrap());
    let (order, _) = with_ticker(async {
        let mut done = as_completed(calls);
        let mut order = Vec::new();
        while let Some((i, r)) = StreamExt::next(&mut done).await {
            order.push((i, r.unwrap()));
        }
        order
    });
    assert_eq!(order, [(1, 10), (2, 450), (0, 900)]);
}

fn a_scheduled_timeout_kills_only_that_task(m: StartMethod) {
    let pool = pool(m, 2);
    let started = std::time::Instant::now();
    let slow = pool
        .schedule(nap, 20_000)
        .timeout(Duration::from_millis(300))
        .submit()
        .unwrap();
    let other = pool.schedule(nap, 600).submit().unwrap();
    let pid_before = pool
        .stats()
        .workers
        .iter()
        .map(|w| w.pid)
        .collect::<Vec<_>>();
    match slow.get() {
        Err(Error::Timeout {
            task: Some(0),
            pid: Some(pid),
        }) => assert!(pid_before.contains(&pid), "{pid} is not a worker"),
        other => panic!("expected a task timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the timeout took {:?}",
        started.elapsed()
    );
    // The other task is untouched, and the pool goes on.
    assert_eq!(other.get().unwrap(), 600);
    assert_eq!(pool.map(nap, [1, 2, 3]).unwrap(), [1, 2, 3]);
    assert_eq!(pool.stats().workers_replaced, 1);
}

fn whoami(_: u32) -> (Option<usize>, u32) {
    std::thread::sleep(Duration::from_millis(5));
    (worker_id(), std::process::id())
}

fn worker_ids_are_slots_kept_by_replacements(m: StartMethod) {
    let pool = pool(m, 2);
    let seen = pool.map_chunked(whoami, 0..20, 1).unwrap();
    let mut slots: Vec<(usize, u32)> = seen.iter().map(|(s, p)| (s.unwrap(), *p)).collect();
    slots.sort();
    slots.dedup();
    assert!(slots.iter().all(|(s, _)| *s < 2), "{slots:?}");
    assert_eq!(worker_id(), None);
    // Kill the worker of slot 0: its replacement takes slot 0.
    let (slot, victim) = slots[0];
    // SAFETY: kill(2) with a pid of our own child.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    assert!(common::wait_until(LONG, || pool
        .stats()
        .workers
        .iter()
        .any(|w| w.pid == victim && !w.alive)));
    let after = pool.map_chunked(whoami, 0..40, 1).unwrap();
    let fresh: Vec<(Option<usize>, u32)> = after
        .into_iter()
        .filter(|(_, p)| !slots.iter().any(|(_, q)| q == p))
        .collect();
    assert!(!fresh.is_empty(), "no replacement ran a task");
    assert!(fresh.iter().all(|(s, _)| *s == Some(slot)), "{fresh:?}");
}

/// A fresh scratch directory for one test.
fn scratch(name: &str, m: StartMethod) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mp-async-{name}-{m:?}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Leaves a file named `tag` in `dir` (pool items carry no descriptors: a file is the
/// side effect a test can look for).
fn touch(dir: &str, tag: &str) {
    std::fs::write(
        std::path::Path::new(dir).join(tag),
        std::process::id().to_string(),
    )
    .unwrap();
}

fn mark_start(dir: String) -> u32 {
    touch(&dir, "started");
    std::thread::sleep(Duration::from_secs(20));
    1
}

fn mark(dir: String) -> u32 {
    touch(&dir, "ran");
    2
}

fn dropped_results_drop_their_queued_tasks(m: StartMethod) {
    let pool = pool(m, 1);
    let dir = scratch("dropped", m);
    let d = dir.display().to_string();
    let busy = pool
        .schedule(mark_start, d.clone())
        .cancel_on_drop()
        .submit()
        .unwrap();
    // Queued behind it, then dropped (as a timed-out `.await` would): never runs.
    let queued = pool.apply_async(mark, d.clone()).unwrap();
    let early = within(Duration::from_millis(50), queued);
    assert!(early.is_none(), "{early:?}");
    assert!(common::wait_until(LONG, || dir.join("started").exists()));
    // Dropping a running cancel_on_drop task kills its worker, which is replaced.
    drop(busy);
    assert!(common::wait_until(LONG, || pool.stats().workers_replaced == 1));
    assert_eq!(pool.apply(nap, 1).unwrap(), 1);
    pool.close();
    pool.join().unwrap();
    assert!(!dir.join("ran").exists(), "the dropped task ran");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `ps` and `top` show a worker under the program's name (a re-exec of /proc/self/exe
/// would otherwise be called `exe`).
fn workers_are_named_after_the_program(m: StartMethod) {
    let pool = pool(m, 1);
    // Once it has run a task, the worker has booted.
    assert_eq!(pool.apply(nap, 1).unwrap(), 1);
    let pid = pool.stats().workers[0].pid;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    let exe = std::env::current_exe().unwrap();
    let name = exe.file_name().unwrap().to_string_lossy();
    let expected: String = name.chars().take(15).collect();
    assert_eq!(comm.trim_end(), expected);
}

each_method!(
    workers_are_named_after_the_program,
    imap_stream_and_async_result_keep_the_thread_free,
    as_completed_gives_completion_order,
    a_scheduled_timeout_kills_only_that_task,
    worker_ids_are_slots_kept_by_replacements,
    dropped_results_drop_their_queued_tasks,
);

// ---------------------------------------------------------------------- tracing

/// Everything the crate's subscriber in this test binary has recorded.
fn log() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOG: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static std::sync::Mutex<Vec<u8>> = Box::leak(Box::default());
        let writer = move || Capture(log);
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(writer)
                .finish(),
        )
        .unwrap();
        log
    })
}

struct Capture(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn a_killed_worker_is_a_warn_event_naming_sigkill(m: StartMethod) {
    let log = log();
    let pool = pool(m, 1);
    let dir = scratch("sigkill", m);
    let r = pool
        .apply_async(mark_start, dir.display().to_string())
        .unwrap();
    assert!(common::wait_until(LONG, || dir.join("started").exists()));
    let pid: u32 = std::fs::read_to_string(dir.join("started"))
        .unwrap()
        .parse()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // SAFETY: kill(2) with the pid of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(matches!(r.get(), Err(Error::WorkerDied { .. })));
    let needle = format!("pid={pid}");
    let line = String::from_utf8_lossy(&log.lock().unwrap())
        .lines()
        .find(|l| l.contains("pool worker died") && l.contains(&needle))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no event for the death of {pid}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("SIGKILL"), "{line}");
    assert!(line.contains("task=0"), "{line}");
}

each_method!(a_killed_worker_is_a_warn_event_naming_sigkill);
