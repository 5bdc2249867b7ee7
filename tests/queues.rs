//! Queues between real processes: the seed example, FIFO order, many producers and
//! consumers, bounds and timeouts, joinable tasks, huge items, and processes SIGKILLed in
//! the middle of a `get` or a `put`.

mod common;

use common::{joined, wait_until, Reaper, LONG};

use multiprocess::{
    get_context, pipe, Connection, Error, JoinableQueue, Process, PutError, Queue, SimpleQueue,
    StartMethod,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::time::{Duration, Instant};

/// A big item and small markers, to see what a consumer really got.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Msg {
    Big(ByteBuf),
    Small(u32),
}

impl Msg {
    fn describe(&self) -> String {
        match self {
            Msg::Big(b) => format!("Big({})", b.len()),
            Msg::Small(n) => format!("Small({n})"),
        }
    }
}

fn word(i: usize, seed: u8) -> [u8; 8] {
    ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed as u64).to_le_bytes()
}

/// A big buffer whose every 8 bytes depend on their position, so a torn copy shows.
fn pattern(len: usize, seed: u8) -> ByteBuf {
    let mut v = vec![0u8; len];
    for (i, c) in v.chunks_mut(8).enumerate() {
        c.copy_from_slice(&word(i, seed)[..c.len()]);
    }
    ByteBuf::from(v)
}

fn is_pattern(b: &[u8], seed: u8) -> bool {
    b.chunks(8)
        .enumerate()
        .all(|(i, c)| c == &word(i, seed)[..c.len()])
}

each_method!(
    seed_example,
    fifo_per_producer,
    blocking_put_woken_by_consumer_process,
    joinable_task_done_and_join,
    consumer_killed_mid_get,
    consumer_killed_while_waiting,
    consumer_killed_mid_small_get_loses_nothing,
    producer_killed_mid_small_put_leaves_nothing,
    producer_killed_mid_put,
    queue_through_connection,
    simple_queue_in_child,
    joinable_consumer_killed_item_delivered_again,
    joinable_lost_item_ends_join_with_an_error,
    joinable_producer_killed_mid_put_counts_exact,
);

// ------------------------------------------------------------------ seed 004

fn rand_num(q: Queue<f64>) {
    // A number of its own in [0, 1): pids are distinct and below 2^22.
    q.put(std::process::id() as f64 / (1u64 << 22) as f64)
        .unwrap();
}

/// Seed 004 "Queues": four processes each put a number; the parent joins them first, then
/// gets the four numbers (safe: `put` does not leave data behind in a feeder thread).
fn seed_example(m: StartMethod) {
    let q = Queue::new().unwrap();
    let procs: Vec<Reaper> = (0..4)
        .map(|_| Reaper(get_context(m).process(rand_num, q.clone())))
        .collect();
    for p in &procs {
        p.0.start().unwrap();
    }
    for p in &procs {
        assert_eq!(joined(&p.0), 0);
    }
    assert_eq!(q.qsize(), 4);
    let mut got: Vec<f64> = (0..4).map(|_| q.get_timeout(LONG).unwrap()).collect();
    got.sort_by(f64::total_cmp);
    got.dedup();
    assert_eq!(got.len(), 4, "one number per process: {got:?}");
    assert!(q.is_empty());
    assert!(matches!(q.try_get(), Err(Error::Empty)));
}

// ------------------------------------------------------------------ ordering

const FIFO_N: u32 = 20_000;

fn fifo_producer((q, id): (Queue<(u32, u32)>, u32)) {
    for seq in 0..FIFO_N {
        q.put((id, seq)).unwrap();
    }
}

fn fifo_per_producer(m: StartMethod) {
    // A small buffer, so that producers wait for the consumer and wrap around often.
    let q = Queue::with_buffer_size(64 * 1024).unwrap();
    let procs: Vec<Reaper> = (0..3)
        .map(|id| Reaper(get_context(m).process(fifo_producer, (q.clone(), id))))
        .collect();
    for p in &procs {
        p.0.start().unwrap();
    }
    let mut next = [0u32; 3];
    for _ in 0..3 * FIFO_N {
        let (id, seq) = q.get_timeout(LONG).unwrap();
        assert_eq!(seq, next[id as usize], "producer {id} out of order");
        next[id as usize] += 1;
    }
    assert_eq!(next, [FIFO_N; 3]);
    for p in &procs {
        assert_eq!(joined(&p.0), 0);
    }
    assert!(matches!(q.try_get(), Err(Error::Empty)));
}

// ------------------------------------------------------------------ many to many

const PRODUCERS: u64 = 4;
/// A million items from each producer.
const MANY: u64 = PRODUCERS * 1_000_000;
const CONSUMERS: u64 = 4;

fn many_producer((q, id): (Queue<Option<u64>>, u64)) {
    let per = MANY / PRODUCERS;
    for v in id * per..(id + 1) * per {
        q.put(Some(v)).unwrap();
    }
}

/// Returns (count, sum, sum of squares) of what it took, until a `None`.
fn many_consumer(q: Queue<Option<u64>>) -> (u64, u64, u128) {
    let (mut n, mut sum, mut sq) = (0u64, 0u64, 0u128);
    while let Some(v) = q.get().unwrap() {
        n += 1;
        sum += v;
        sq += (v as u128) * (v as u128);
    }
    (n, sum, sq)
}

/// 4 producer processes × 4 consumer processes, a million items each: every item arrives
/// exactly once.
#[test]
fn four_by_four_million_each_exactly_once() {
    let q = Queue::new().unwrap();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| multiprocess::spawn(many_consumer, q.clone()).unwrap())
        .collect();
    let producers: Vec<Reaper> = (0..PRODUCERS)
        .map(|id| Reaper(Process::new(many_producer, (q.clone(), id))))
        .collect();
    for p in &producers {
        p.0.start().unwrap();
    }
    for p in &producers {
        assert_eq!(joined(&p.0), 0);
    }
    for _ in 0..CONSUMERS {
        q.put(None).unwrap();
    }
    let (mut n, mut sum, mut sq) = (0u64, 0u64, 0u128);
    for c in consumers {
        let (cn, cs, csq) = c.join().unwrap();
        n += cn;
        sum += cs;
        sq += csq;
    }
    assert_eq!(n, MANY);
    assert_eq!(sum, MANY * (MANY - 1) / 2);
    let m = MANY as u128;
    assert_eq!(sq, (m - 1) * m * (2 * m - 1) / 6);
    assert!(q.is_empty());
}

// ------------------------------------------------------------------ bounds and timeouts

#[test]
fn maxsize_full_empty_and_timeouts() {
    let q: Queue<String> = Queue::with_maxsize(2).unwrap();
    assert_eq!(q.maxsize(), 2);
    assert!(q.is_empty() && !q.is_full());
    q.put("a".into()).unwrap();
    q.try_put("b".into()).unwrap();
    assert!(q.is_full());
    assert_eq!(q.qsize(), 2);
    match q.try_put("c".into()) {
        Err(PutError::Full(item)) => assert_eq!(item, "c"),
        other => panic!("expected Full, got {other:?}"),
    }
    let t = Instant::now();
    match q.put_timeout("d".into(), Duration::from_millis(100)) {
        Err(PutError::Full(item)) => assert_eq!(item, "d"),
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(100));
    // `?` turns Full into Error::Full.
    let as_error: Result<(), Error> = (|| Ok(q.try_put("e".to_string())?))();
    assert!(matches!(as_error, Err(Error::Full)));

    assert_eq!(q.get().unwrap(), "a");
    assert_eq!(q.get_timeout(Duration::from_secs(1)).unwrap(), "b");
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    let t = Instant::now();
    assert!(matches!(
        q.get_timeout(Duration::from_millis(100)),
        Err(Error::Empty)
    ));
    assert!(t.elapsed() >= Duration::from_millis(100));
    assert!(q.is_empty());

    // An unbounded queue with a small buffer: `try_put` says Full when the bytes run out.
    let q: Queue<ByteBuf> = Queue::with_buffer_size(64 * 1024).unwrap();
    let mut n = 0;
    while q.try_put(ByteBuf::from(vec![7u8; 1000])).is_ok() {
        n += 1;
        assert!(n < 100, "a 64 KiB buffer cannot hold 100 KB");
    }
    assert!(n >= 50, "{n} items of 1000 bytes in 64 KiB");
    assert!(!q.is_full(), "unbounded queues are never `full`");
    for _ in 0..n {
        assert_eq!(q.try_get().unwrap().len(), 1000);
    }
    assert!(matches!(q.try_get(), Err(Error::Empty)));
}

#[test]
fn close_is_per_handle() {
    let q: Queue<u8> = Queue::new().unwrap();
    let other = q.clone();
    q.put(1).unwrap();
    q.close();
    assert!(q.is_closed());
    assert!(matches!(q.put(2), Err(Error::Closed(_))));
    assert!(matches!(q.get(), Err(Error::Closed(_))));
    assert!(!other.is_closed());
    other.put(3).unwrap();
    assert_eq!(other.get().unwrap(), 1);
    assert_eq!(other.get().unwrap(), 3);
}

fn taker(q: Queue<u64>) -> u64 {
    let mut sum = 0;
    for _ in 0..3 {
        sum += q.get().unwrap();
    }
    sum
}

/// A put on a full queue waits until a consumer in another process makes room.
fn blocking_put_woken_by_consumer_process(m: StartMethod) {
    let q = Queue::with_maxsize(1).unwrap();
    q.put(1).unwrap();
    let h = get_context(m).spawn(taker, q.clone()).unwrap();
    q.put(2).unwrap(); // waits for the child to take 1
    q.put(3).unwrap();
    assert_eq!(h.join().unwrap(), 6);
    assert!(q.is_empty());
}

/// A large item that cannot finish before its deadline is aborted: no consumer sees any of
/// it, and the queue goes on working.
#[test]
fn timed_out_streaming_put_is_discarded() {
    let q: Queue<Msg> = Queue::with_buffer_size(64 * 1024).unwrap();
    let big = Msg::Big(pattern(1 << 20, 1));
    match q.put_timeout(big, Duration::from_millis(50)) {
        Err(PutError::Full(Msg::Big(b))) => assert!(is_pattern(&b, 1), "item handed back whole"),
        other => panic!("expected Full, got {:?}", other.map_err(|e| e.is_full())),
    }
    assert!(q.is_empty());
    // A consumer reads past the aborted part (which fills the buffer) and finds nothing.
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    q.put(Msg::Small(5)).unwrap();
    assert_eq!(q.get_timeout(LONG).unwrap(), Msg::Small(5));
    assert!(matches!(q.try_get(), Err(Error::Empty)));
}

// ------------------------------------------------------------------ joinable

fn joinable_worker(q: JoinableQueue<u32>) -> u32 {
    let mut sum = 0;
    loop {
        let n = q.get().unwrap();
        sum += n;
        q.task_done().unwrap();
        if n == 0 {
            return sum;
        }
    }
}

fn joinable_task_done_and_join(m: StartMethod) {
    let q = JoinableQueue::new().unwrap();
    for n in 1..=10 {
        q.put(n).unwrap();
    }
    assert_eq!(q.unfinished_tasks(), 10);
    assert!(!q.join_timeout(Duration::from_millis(20)).unwrap());
    let h = get_context(m).spawn(joinable_worker, q.clone()).unwrap();
    q.put(0).unwrap();
    q.join().unwrap();
    assert_eq!(q.unfinished_tasks(), 0);
    assert_eq!(h.join().unwrap(), 55);
    match q.task_done() {
        Err(e @ Error::TaskDoneTooOften) => assert!(e.to_string().contains("too many")),
        other => panic!("expected TaskDoneTooOften, got {other:?}"),
    }
    // Taken but not done: join waits.
    q.put(1).unwrap();
    assert_eq!(q.get().unwrap(), 1);
    assert!(!q.join_timeout(Duration::from_millis(20)).unwrap());
    q.task_done().unwrap();
    assert!(q.join_timeout(Duration::from_secs(1)).unwrap());
}

// ------------------------------------------------------------------ big items

const BIG: usize = 150 << 20;

fn status_bytes(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Returns how far its resident memory rose above where it started, so the test can check
/// that `put` and `get` streamed the items instead of making whole encoded copies.
fn big_echo((to_child, to_parent): (Queue<Msg>, Queue<Msg>)) -> (u64, bool) {
    // Reset the high-water mark ("5" to clear_refs), then measure from here.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let start = status_bytes("VmRSS:");
    // Take a big item between two small ones, check it, and send a big one back.
    assert_eq!(to_child.get().unwrap(), Msg::Small(1));
    let ok = match to_child.get().unwrap() {
        Msg::Big(b) => b.len() == BIG && is_pattern(&b, 3),
        _ => false,
    };
    assert_eq!(to_child.get().unwrap(), Msg::Small(2));
    drop(to_child);
    to_parent.put(Msg::Small(3)).unwrap();
    to_parent.put(Msg::Big(pattern(BIG, 9))).unwrap();
    to_parent.put(Msg::Small(4)).unwrap();
    (status_bytes("VmHWM:").saturating_sub(start), ok)
}

/// 150 MiB items through a 4 MiB buffer, each way, with small items around them. (About
/// sizes, not start methods: run under the default one.)
#[test]
fn big_items_both_ways() {
    let m = multiprocess::get_start_method();
    let to_child = Queue::new().unwrap();
    let to_parent = Queue::new().unwrap();
    let h = get_context(m)
        .spawn(big_echo, (to_child.clone(), to_parent.clone()))
        .unwrap();
    to_child.put(Msg::Small(1)).unwrap();
    to_child.put(Msg::Big(pattern(BIG, 3))).unwrap();
    to_child.put(Msg::Small(2)).unwrap();
    assert_eq!(to_parent.get_timeout(LONG).unwrap(), Msg::Small(3));
    match to_parent.get_timeout(LONG).unwrap() {
        Msg::Big(b) => assert!(b.len() == BIG && is_pattern(&b, 9), "big item intact"),
        other => panic!("expected the big item, got {}", other.describe()),
    }
    assert_eq!(to_parent.get_timeout(LONG).unwrap(), Msg::Small(4));
    let (peak, ok) = h.join().unwrap();
    assert!(ok, "the child got the big item intact");
    // The child held one received item, then one item to send (not both at once): far
    // below what an extra encoded copy of either would take.
    assert!(
        peak < (BIG as u64) * 3 / 2,
        "RSS rose by {} MiB: an item was copied whole",
        peak >> 20
    );
}

// ------------------------------------------------------------------ crashes

/// In a child: the queue through which it says "I am in the middle of it now".
static NOTE: std::sync::OnceLock<Queue<u32>> = std::sync::OnceLock::new();

/// Tells the parent (through `NOTE`), then never returns: the parent kills us here.
fn announce_and_stall() -> ! {
    NOTE.get().expect("NOTE is set").put(1).unwrap();
    loop {
        std::thread::park();
    }
}

/// Decoding this stalls the consumer in the middle of an item: the part before it has
/// been read (and its space freed), the rest not.
struct StallGet;

impl<'de> Deserialize<'de> for StallGet {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        announce_and_stall()
    }
}

/// Takes a 16 MiB buffer out of the queue and stalls before the rest of the item.
/// Waits until the child reports (by putting 1 on `note`) that it is `doing` the step under
/// test, then SIGKILLs it and reaps it.
fn kill_when_noted(p: &Process, note: &Queue<u32>, doing: &str) {
    assert_eq!(note.get_timeout(LONG).unwrap(), 1, "{doing}");
    p.kill().unwrap();
    assert_eq!(joined(p), -libc::SIGKILL);
}

fn stalling_getter((q, note): (Queue<(ByteBuf, StallGet)>, Queue<u32>)) {
    let _ = NOTE.set(note);
    let _ = q.get();
}

/// The same queue, with another item type (a handle is typed only on this side).
fn retyped<A, B>(q: &Queue<A>) -> Queue<B> {
    let (a, b) = pipe().unwrap();
    a.send(q).unwrap();
    b.recv().unwrap()
}

const STREAMED: usize = 16 << 20;

/// A consumer SIGKILLed in the middle of taking an item (it has read 16 MiB of it through
/// a 4 MiB buffer): that item is lost, nothing else; the next consumer gets the next item.
fn consumer_killed_mid_get(m: StartMethod) {
    let q: Queue<(ByteBuf, u32)> = Queue::new().unwrap();
    let note = Queue::new().unwrap();
    let c = Reaper(get_context(m).process(stalling_getter, (retyped(&q), note.clone())));
    c.0.start().unwrap();
    let producer = {
        let q = q.clone();
        std::thread::spawn(move || {
            q.put((pattern(STREAMED, 5), 0)).unwrap();
            q.put((ByteBuf::new(), 7)).unwrap();
        })
    };
    kill_when_noted(&c.0, &note, "the consumer is mid-item");
    // The next consumer: the rest of the half-taken item is skipped, never delivered.
    let (b, n) = q.get_timeout(LONG).unwrap();
    assert_eq!((b.len(), n), (0, 7));
    producer.join().unwrap();
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    // And the queue still works both ways.
    q.put((ByteBuf::from(vec![1]), 8)).unwrap();
    assert_eq!(q.get().unwrap().1, 8);
}

fn stalling_small_getter((q, note): (Queue<(u32, StallGet)>, Queue<u32>)) {
    let _ = NOTE.set(note);
    let _ = q.get();
}

/// A consumer SIGKILLed while decoding an item that sits in the buffer in one piece: the
/// item was not taken yet, so the next consumer gets it — nothing lost, nothing twice.
fn consumer_killed_mid_small_get_loses_nothing(m: StartMethod) {
    let q: Queue<(u32, u32)> = Queue::new().unwrap();
    let note = Queue::new().unwrap();
    q.put((1, 0)).unwrap();
    q.put((2, 0)).unwrap();
    let c = Reaper(get_context(m).process(stalling_small_getter, (retyped(&q), note.clone())));
    c.0.start().unwrap();
    kill_when_noted(&c.0, &note, "the consumer is decoding item 1");
    assert_eq!(q.get_timeout(LONG).unwrap(), (1, 0));
    assert_eq!(q.get_timeout(LONG).unwrap(), (2, 0));
    assert!(matches!(q.try_get(), Err(Error::Empty)));
}

fn parked_getter((q, conn): (Queue<u32>, Connection)) {
    conn.send(&"ready").unwrap();
    let _ = q.get();
}

/// A consumer SIGKILLed while it waits in `get` (holding the consumer lock) does not wedge
/// the queue, and takes nothing with it.
fn consumer_killed_while_waiting(m: StartMethod) {
    let q = Queue::new().unwrap();
    let (a, b) = pipe().unwrap();
    let c = Reaper(get_context(m).process(parked_getter, (q.clone(), b)));
    c.0.start().unwrap();
    let pid = c.0.pid().unwrap();
    assert_eq!(a.recv::<String>().unwrap(), "ready");
    // It is asleep in the queue once its state in /proc says so.
    assert!(wait_until(LONG, || {
        std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("futex"))
    }));
    c.0.kill().unwrap();
    assert_eq!(joined(&c.0), -libc::SIGKILL);
    q.put(11).unwrap();
    assert_eq!(q.get_timeout(LONG).unwrap(), 11);
}

/// Encodes as `Msg::Big(bytes)`, but stalls after the bytes, before `put` can publish
/// the end of the item.
struct StallPut(ByteBuf);

struct BytesThenStall<'a>(&'a [u8]);

impl Serialize for BytesThenStall<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)?;
        announce_and_stall()
    }
}

impl Serialize for StallPut {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_variant("Msg", 0, "Big", &BytesThenStall(&self.0))
    }
}

fn stalling_putter((q, stall, note): (Queue<Msg>, Queue<StallPut>, Queue<u32>)) {
    let _ = NOTE.set(note);
    q.put(Msg::Small(1)).unwrap();
    stall.put(StallPut(pattern(STREAMED, 6))).unwrap();
}

fn stalling_small_putter((stall, note): (Queue<StallPut>, Queue<u32>)) {
    let _ = NOTE.set(note);
    stall.put(StallPut(ByteBuf::from(vec![1, 2, 3]))).unwrap();
}

/// A producer SIGKILLed in the middle of a small `put` (holding the producer lock, its
/// bytes written but not published): nobody sees any of it; the next put takes the lock
/// over and its item is the one delivered.
fn producer_killed_mid_small_put_leaves_nothing(m: StartMethod) {
    let q: Queue<Msg> = Queue::new().unwrap();
    let note = Queue::new().unwrap();
    let p = Reaper(get_context(m).process(stalling_small_putter, (retyped(&q), note.clone())));
    p.0.start().unwrap();
    assert_eq!(
        note.get_timeout(LONG).unwrap(),
        1,
        "the producer is mid-put"
    );
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    p.0.kill().unwrap();
    assert_eq!(joined(&p.0), -libc::SIGKILL);
    q.put_timeout(Msg::Small(5), LONG).unwrap();
    assert_eq!(q.get_timeout(LONG).unwrap(), Msg::Small(5));
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    assert_eq!(q.qsize(), 0);
}

/// Takes items until `Small(0)`; returns what it saw.
fn collector(q: Queue<Msg>) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match q.get() {
            Ok(Msg::Small(0)) => return seen,
            Ok(m) => seen.push(m.describe()),
            Err(e) => seen.push(format!("error: {e}")),
        }
    }
}

/// A producer SIGKILLed in the middle of a `put` (it has streamed 16 MiB of the item
/// through a 4 MiB buffer, so the consumer is taking it): the consumer discards the part it
/// got; nobody ever sees half an item; the queue works on.
fn producer_killed_mid_put(m: StartMethod) {
    let q: Queue<Msg> = Queue::new().unwrap();
    let note = Queue::new().unwrap();
    let c = get_context(m).spawn(collector, q.clone()).unwrap();
    let p = Reaper(get_context(m).process(stalling_putter, (q.clone(), retyped(&q), note.clone())));
    p.0.start().unwrap();
    kill_when_noted(&p.0, &note, "the producer is mid-put");
    q.put(Msg::Small(3)).unwrap();
    q.put(Msg::Small(0)).unwrap();
    assert_eq!(c.join().unwrap(), vec!["Small(1)", "Small(3)"]);
    assert!(q.is_empty());
}

// ------------------------------------------------------------------ bad items, handles

/// An item read with the wrong type is an error for that get; the next get works. The
/// second handle, typed differently, comes through a Connection.
#[test]
fn mistyped_items_are_errors_and_the_next_get_works() {
    let q: Queue<Msg> = Queue::new().unwrap();
    let (a, b) = pipe().unwrap();
    a.send(&q).unwrap();
    let as_u16: Queue<u16> = b.recv().unwrap();
    let (a2, b2) = pipe().unwrap();
    a2.send(&q).unwrap();
    let as_vec: Queue<Vec<u64>> = b2.recv().unwrap();

    // Too long for the type (leftover bytes).
    q.put(Msg::Small(1)).unwrap();
    assert!(matches!(as_u16.get(), Err(Error::Serialization(_))));
    // Too short for the type (runs out).
    q.put(Msg::Big(ByteBuf::from(vec![1, 2, 3]))).unwrap();
    assert!(matches!(as_vec.get(), Err(Error::Serialization(_))));
    // A streamed item (larger than the buffer's free space), both ways.
    q.put(Msg::Small(2)).unwrap();
    let big = {
        let q = q.clone();
        std::thread::spawn(move || {
            q.put(Msg::Big(pattern(12 << 20, 2))).unwrap();
            q.put(Msg::Big(pattern(12 << 20, 3))).unwrap();
            q.put(Msg::Small(4)).unwrap();
        })
    };
    assert_eq!(q.get_timeout(LONG).unwrap(), Msg::Small(2));
    assert!(matches!(as_u16.get(), Err(Error::Serialization(_))));
    assert!(matches!(as_vec.get(), Err(Error::Serialization(_))));
    assert_eq!(q.get_timeout(LONG).unwrap(), Msg::Small(4));
    big.join().unwrap();
    assert!(q.is_empty());
}

fn conn_user(conn: Connection) {
    let q: Queue<String> = conn.recv().unwrap();
    let got = q.get().unwrap();
    q.put(format!("child got {got:?}")).unwrap();
    conn.send(&"done").unwrap();
}

/// A queue sent through a Connection arrives usable in the child.
fn queue_through_connection(m: StartMethod) {
    let (a, b) = pipe().unwrap();
    let c = Reaper(get_context(m).process(conn_user, b));
    c.0.start().unwrap();
    let q: Queue<String> = Queue::new().unwrap();
    a.send(&q).unwrap();
    q.put("from parent".into()).unwrap();
    assert_eq!(a.recv::<String>().unwrap(), "done");
    assert_eq!(q.get().unwrap(), "child got \"from parent\"");
    assert_eq!(joined(&c.0), 0);
}

fn simple_child(q: SimpleQueue<(u8, String)>) {
    let (n, s) = q.get().unwrap();
    q.put((n + 1, s + "!")).unwrap();
}

fn simple_queue_in_child(m: StartMethod) {
    let q = SimpleQueue::new().unwrap();
    q.put((1, "hi".to_string())).unwrap();
    let c = Reaper(get_context(m).process(simple_child, q.clone()));
    c.0.start().unwrap();
    assert_eq!(joined(&c.0), 0);
    assert_eq!(q.get().unwrap(), (2, "hi!".to_string()));
    assert!(q.is_empty());
}

/// Serializes a big buffer, then fails: the part already streamed must never be seen.
struct FailsLate(ByteBuf);

impl Serialize for FailsLate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeTuple};
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&self.0)?;
        Err(S::Error::custom("fails after the bytes"))
    }
}

/// An item that fails to encode half-way (after more than the buffer holds went out) is an
/// error for that put; consumers never see a piece of it.
#[test]
fn encode_failure_mid_stream_is_discarded() {
    let q: Queue<FailsLate> = Queue::with_buffer_size(64 * 1024).unwrap();
    let (a, b) = pipe().unwrap();
    a.send(&q).unwrap();
    let reader: Queue<Msg> = b.recv().unwrap();
    let (a, b) = pipe().unwrap();
    a.send(&q).unwrap();
    let writer: Queue<Msg> = b.recv().unwrap();
    let consumer = std::thread::spawn(move || {
        let first = reader.get_timeout(LONG).map(|m| m.describe());
        (first, reader)
    });
    match q.put(FailsLate(pattern(1 << 20, 4))) {
        Err(Error::Serialization(msg)) => assert!(msg.contains("fails after"), "{msg}"),
        other => panic!("expected a serialization error, got {other:?}"),
    }
    writer.put(Msg::Small(9)).unwrap();
    let (first, reader) = consumer.join().unwrap();
    assert_eq!(first.unwrap(), "Small(9)");
    assert!(matches!(reader.try_get(), Err(Error::Empty)));
}

#[test]
fn zero_sized_items_and_wraparound() {
    let q: Queue<()> = Queue::with_buffer_size(64 * 1024).unwrap();
    for _ in 0..3 {
        for _ in 0..1000 {
            q.put(()).unwrap();
        }
        assert_eq!(q.qsize(), 1000);
        for _ in 0..1000 {
            q.get().unwrap();
        }
    }
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    // Items of every size from 0 to 3000 bytes, through a small ring many times over.
    let q: Queue<String> = Queue::with_buffer_size(64 * 1024).unwrap();
    let sender = {
        let q = q.clone();
        std::thread::spawn(move || {
            for n in 0..3000 {
                q.put("y".repeat(n)).unwrap();
            }
        })
    };
    for n in 0..3000 {
        assert_eq!(q.get_timeout(LONG).unwrap().len(), n);
    }
    sender.join().unwrap();
}

#[test]
fn a_queue_is_not_a_joinable_queue() {
    let q: Queue<u8> = Queue::new().unwrap();
    let (a, b) = pipe().unwrap();
    a.send(&q).unwrap();
    assert!(b.recv::<JoinableQueue<u8>>().is_err());
    let j: JoinableQueue<u8> = JoinableQueue::new().unwrap();
    a.send(&j).unwrap();
    let back: JoinableQueue<u8> = b.recv().unwrap();
    back.put(1).unwrap();
    assert_eq!(j.unfinished_tasks(), 1);
}

/// Items of mixed sizes — tiny, around the split threshold, larger than the whole buffer —
/// through a 64 KiB buffer: each arrives whole, in order.
#[test]
fn mixed_sizes_through_a_small_buffer() {
    let q: Queue<(u32, ByteBuf)> = Queue::with_buffer_size(64 * 1024).unwrap();
    // Deterministic sizes spread from 0 to 200 KB, with the awkward ones included.
    let sizes: Vec<usize> = (0..600u32)
        .map(|i| match i % 6 {
            0 => 0,
            1 => 4096 - 8,
            2 => (i as usize * 7919) % 70_000,
            3 => 65_536,
            4 => (i as usize * 104_729) % 200_000,
            _ => i as usize % 64,
        })
        .collect();
    let sender = {
        let (q, sizes) = (q.clone(), sizes.clone());
        std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                q.put((i as u32, pattern(n, i as u8))).unwrap();
            }
        })
    };
    for (i, &n) in sizes.iter().enumerate() {
        let (j, b) = q.get_timeout(LONG).unwrap();
        assert_eq!(j as usize, i);
        assert_eq!(b.len(), n, "item {i}");
        assert!(is_pattern(&b, i as u8), "item {i} of {n} bytes is intact");
    }
    sender.join().unwrap();
    assert!(q.is_empty());
}

// ------------------------------------------------------------------ at-least-once

/// The same joinable queue, with another item type.
fn retyped_joinable<A, B>(q: &JoinableQueue<A>) -> JoinableQueue<B> {
    let (a, b) = pipe().unwrap();
    a.send(q).unwrap();
    b.recv().unwrap()
}

/// A consumer that says which item it took (through `note`), then works on it for ever.
fn stuck_consumer<T: Serialize + serde::de::DeserializeOwned>(
    (q, note): (JoinableQueue<T>, Connection),
) {
    let item = q.get().unwrap();
    note.send(&item).unwrap();
    loop {
        std::thread::park();
    }
}

/// A consumer that reports every item it finished through `done`, then marks it done;
/// stops at `u32::MAX`.
fn finishing_consumer((q, done): (JoinableQueue<u32>, Queue<u32>)) {
    loop {
        let n = q.get().unwrap();
        if n != u32::MAX {
            done.put(n).unwrap();
        }
        q.task_done().unwrap();
        if n == u32::MAX {
            return;
        }
    }
}

/// Three consumers on a JoinableQueue; one is SIGKILLed while it works on an item (it has
/// said which, through a pipe). That item is delivered again to one of the other two,
/// `join` returns, and every item is processed at least once.
fn joinable_consumer_killed_item_delivered_again(m: StartMethod) {
    const N: u32 = 30;
    let q: JoinableQueue<u32> = JoinableQueue::new().unwrap();
    let done: Queue<u32> = Queue::new().unwrap();
    for n in 0..N {
        q.put(n).unwrap();
    }
    let ctx = get_context(m);
    let (note, their_note) = pipe().unwrap();
    let victim = Reaper(ctx.process(stuck_consumer::<u32>, (q.clone(), their_note)));
    victim.0.start().unwrap();
    assert!(note.poll(Some(LONG)).unwrap(), "the victim took an item");
    let taken: u32 = note.recv().unwrap();
    let others: Vec<Reaper> = (0..2)
        .map(|_| Reaper(ctx.process(finishing_consumer, (q.clone(), done.clone()))))
        .collect();
    for p in &others {
        p.0.start().unwrap();
    }
    victim.0.kill().unwrap();
    assert_eq!(joined(&victim.0), -libc::SIGKILL);
    assert!(
        q.join_timeout(LONG).unwrap(),
        "join returns once the killed consumer's item is done by another"
    );
    let mut seen: Vec<u32> = std::iter::from_fn(|| done.try_get().ok()).collect();
    seen.sort_unstable();
    assert!(seen.contains(&taken), "item {taken} was delivered again");
    seen.dedup();
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "every item, none lost");
    for _ in &others {
        q.put(u32::MAX).unwrap();
    }
    for p in &others {
        assert_eq!(joined(&p.0), 0);
    }
    assert_eq!(q.unfinished_tasks(), 0);
}

/// An item too large to keep a copy of, taken by a consumer that is SIGKILLed: it cannot
/// be delivered again, so `join` ends with `TasksLost` instead of waiting for ever; a
/// `task_done` for it lets `join` end normally.
fn joinable_lost_item_ends_join_with_an_error(m: StartMethod) {
    let q: JoinableQueue<ByteBuf> = JoinableQueue::new().unwrap();
    q.put(ByteBuf::from(vec![7u8; 200 * 1024])).unwrap();
    let (note, their_note) = pipe().unwrap();
    let victim = Reaper(get_context(m).process(stuck_consumer::<ByteBuf>, (q.clone(), their_note)));
    victim.0.start().unwrap();
    assert!(note.poll(Some(LONG)).unwrap(), "the victim took the item");
    victim.0.kill().unwrap();
    assert_eq!(joined(&victim.0), -libc::SIGKILL);
    assert!(matches!(
        q.join_timeout(LONG),
        Err(Error::TasksLost { count: 1 })
    ));
    assert_eq!(q.unfinished_tasks(), 1);
    q.task_done().unwrap();
    assert!(q.join_timeout(LONG).unwrap());
}

fn stalling_joinable_putter(
    (q, stall, note): (JoinableQueue<Msg>, JoinableQueue<StallPut>, Queue<u32>),
) {
    let _ = NOTE.set(note);
    q.put(Msg::Small(1)).unwrap();
    stall.put(StallPut(ByteBuf::from(vec![1, 2, 3]))).unwrap();
}

/// A producer SIGKILLed in the middle of a `put` on a JoinableQueue: the task count
/// holds exactly the items that were put whole, and `join` ends once they are done.
fn joinable_producer_killed_mid_put_counts_exact(m: StartMethod) {
    let q: JoinableQueue<Msg> = JoinableQueue::new().unwrap();
    let note = Queue::new().unwrap();
    let p = Reaper(get_context(m).process(
        stalling_joinable_putter,
        (q.clone(), retyped_joinable(&q), note.clone()),
    ));
    p.0.start().unwrap();
    kill_when_noted(&p.0, &note, "the producer is mid-put");
    assert_eq!(q.unfinished_tasks(), 1);
    q.put_timeout(Msg::Small(2), LONG).unwrap();
    assert_eq!(q.unfinished_tasks(), 2);
    for want in [1, 2] {
        assert_eq!(q.get_timeout(LONG).unwrap(), Msg::Small(want));
        q.task_done().unwrap();
    }
    assert!(q.join_timeout(LONG).unwrap());
    assert!(matches!(q.task_done(), Err(Error::TaskDoneTooOften)));
}

#[derive(Serialize, Deserialize)]
struct Frame {
    id: u64,
    pixels: Vec<u8>,
}

/// [`Frame`] as a view into the caller's buffer.
#[derive(Deserialize)]
struct FrameView<'a> {
    id: u64,
    #[serde(borrow)]
    pixels: &'a [u8],
}

fn frame_producer((bytes, frames): (Queue<Vec<u8>>, Queue<Frame>)) {
    // Small (one chunk in the ring), then bigger than the whole ring (streamed).
    for (i, len) in [(1u8, 1000usize), (2, 10 << 20), (3, 10 << 20), (4, 0)] {
        bytes.put(vec![i; len]).unwrap();
    }
    bytes.put(b"not a u32".to_vec()).unwrap();
    for id in 0..3u64 {
        let pixels = pattern(6 << 20, id as u8).into_vec();
        frames.put(Frame { id, pixels }).unwrap();
    }
}

#[test]
fn get_borrowed_views_items_in_the_callers_buffer() {
    let bytes: Queue<Vec<u8>> = Queue::new().unwrap();
    let frames: Queue<Frame> = Queue::new().unwrap();
    let mut buf = Vec::new();
    assert!(matches!(
        bytes.try_get_borrowed::<&[u8]>(&mut buf),
        Err(Error::Empty)
    ));
    let p = Reaper(Process::new(
        frame_producer,
        (bytes.clone(), frames.clone()),
    ));
    p.0.start().unwrap();
    let mut at = None;
    for (i, len) in [(1u8, 1000usize), (2, 10 << 20), (3, 10 << 20), (4, 0)] {
        let got: &[u8] = bytes.get_borrowed_timeout(&mut buf, LONG).unwrap();
        assert_eq!(got.len(), len);
        assert!(got.iter().all(|&b| b == i));
        if len > 0 {
            // The second big item lands in the memory of the first.
            let ptr = got.as_ptr();
            if i == 3 {
                assert_eq!(Some(ptr), at);
            }
            at = Some(ptr);
        }
    }
    // An item that is not a `U` is an error, and consumed.
    assert!(matches!(
        bytes.get_borrowed::<u32>(&mut buf),
        Err(Error::Serialization(_))
    ));
    assert!(matches!(bytes.try_get(), Err(Error::Empty)));
    for id in 0..3u64 {
        let f: FrameView = frames.get_borrowed(&mut buf).unwrap();
        assert_eq!(f.id, id);
        assert_eq!(f.pixels.len(), 6 << 20);
        assert!(is_pattern(f.pixels, id as u8));
    }
    assert_eq!(joined(&p.0), 0);
}
