//! The async forms, awaited under real runtimes (tokio current-thread and multi-thread,
//! `futures::executor`, smol) against real children: while a future waits, the thread
//! that polls it keeps running other tasks.

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
