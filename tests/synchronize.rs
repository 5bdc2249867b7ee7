//! Locks, semaphores, conditions, events, barriers and shared values between real
//! processes, under every start method; holder death by real SIGKILL.

mod common;

use common::{wait_until, LONG};

use multiprocess::{
    get_context, pipe, Array, Barrier, BoundedSemaphore, Condition, Error, Event, Lock, Process,
    RLock, RawArray, RawValue, Semaphore, StartMethod, Value,
};
use std::time::{Duration, Instant};

/// Kills and reaps children if the test fails halfway.
struct Reaper(Vec<Process>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for p in &self.0 {
            if p.pid().is_some() {
                let _ = p.kill();
                let _ = p.join_timeout(LONG);
            }
        }
    }
}

impl Reaper {
    fn start(m: StartMethod, procs: Vec<Process>) -> Reaper {
        let _ = m;
        for p in &procs {
            p.start().unwrap();
        }
        Reaper(procs)
    }

    fn join_all(&self) -> Vec<i32> {
        self.0
            .iter()
            .map(|p| {
                assert!(p.join_timeout(LONG).unwrap(), "child did not end in time");
                p.exitcode().unwrap()
            })
            .collect()
    }
}

each_method!(
    counter_under_lock,
    semaphore_admits_at_most_k,
    barrier_rounds,
    condition_producer_consumer,
    event_wakes_every_waiter,
    rlock_reentrant_and_owned,
    lock_holder_killed,
    value_holder_killed_while_others_wait,
    rlock_holder_killed,
    barrier_party_killed,
    condition_waiter_killed,
);

fn add_many(args: (Value<i64>, Array<u32>, u32)) {
    let (v, a, n) = args;
    for i in 0..n {
        *v.lock() += 1;
        if i % 64 == 0 {
            a.lock()[0] += 1;
        }
    }
}

fn counter_under_lock(m: StartMethod) {
    let v = Value::new(0i64).unwrap();
    let a = Array::<u32>::zeroed(1).unwrap();
    let ctx = get_context(m);
    let r = Reaper::start(
        m,
        (0..4)
            .map(|_| ctx.process(add_many, (v.clone(), a.clone(), 5000)))
            .collect(),
    );
    assert_eq!(r.join_all(), [0, 0, 0, 0]);
    assert_eq!(v.get(), 20_000);
    assert_eq!(a.to_vec(), [4 * 5000u32.div_ceil(64)]);
}

fn hold_a_permit(args: (Semaphore, Value<[u32; 2]>)) {
    let (sem, stats) = args;
    for _ in 0..30 {
        let _permit = sem.acquire();
        {
            let mut s = stats.lock();
            s[0] += 1;
            s[1] = s[1].max(s[0]);
        }
        std::thread::yield_now();
        stats.lock()[0] -= 1;
    }
}

fn semaphore_admits_at_most_k(m: StartMethod) {
    let sem = Semaphore::new(2).unwrap();
    // [holders now, most holders seen]
    let stats = Value::new([0u32; 2]).unwrap();
    let ctx = get_context(m);
    let r = Reaper::start(
        m,
        (0..5)
            .map(|_| ctx.process(hold_a_permit, (sem.clone(), stats.clone())))
            .collect(),
    );
    assert_eq!(r.join_all(), [0; 5]);
    let [now, max] = stats.get();
    assert_eq!(now, 0);
    assert!((1..=2).contains(&max), "{max} holders at once");
    assert_eq!(sem.get_value(), 2);
}

fn meet(args: (Barrier, RawArray<u32>, u32)) {
    let (b, seen, me) = args;
    for round in 0..3u32 {
        let i = b.wait_timeout(LONG).unwrap();
        // Every index 0..parties comes out once per round.
        seen.set((round * 4 + i) as usize, me + 1).unwrap();
    }
}

fn barrier_rounds(m: StartMethod) {
    let b = Barrier::new(4).unwrap();
    assert_eq!(b.parties(), 4);
    let seen = RawArray::<u32>::zeroed(12).unwrap();
    let ctx = get_context(m);
    let r = Reaper::start(
        m,
        (0..3)
            .map(|me| ctx.process(meet, (b.clone(), seen.clone(), me)))
            .collect(),
    );
    meet((b.clone(), seen.clone(), 3));
    assert_eq!(r.join_all(), [0; 3]);
    // Each round, each of the 4 indices went to exactly one party.
    for round in seen.to_vec().chunks(4) {
        let mut parties = round.to_vec();
        parties.sort();
        assert_eq!(parties, [1, 2, 3, 4], "indices per round: {round:?}");
    }
    assert!(!b.broken());
}

/// Slot layout: [full flag, item, done flag].
fn produce(args: (Condition, RawArray<u64>, u64)) {
    let (cond, slot, n) = args;
    for item in 1..=n {
        let mut g = cond.acquire();
        g.wait_for(|| slot.get(0) == Some(0));
        slot.set(1, item).unwrap();
        slot.set(0, 1).unwrap();
        cond.notify_all();
    }
}

fn condition_producer_consumer(m: StartMethod) {
    let cond = Condition::new().unwrap();
    let slot = RawArray::<u64>::zeroed(2).unwrap();
    let n = 200u64;
    let r = Reaper::start(
        m,
        vec![get_context(m).process(produce, (cond.clone(), slot.clone(), n))],
    );
    let mut sum = 0;
    for _ in 0..n {
        let mut g = cond.acquire();
        g.wait_for_timeout(LONG, || slot.get(0) == Some(1))
            .expect("the producer's item");
        sum += slot.get(1).unwrap();
        slot.set(0, 0).unwrap();
        cond.notify_all();
    }
    assert_eq!(sum, n * (n + 1) / 2);
    assert_eq!(r.join_all(), [0]);
}

fn wait_for_event(args: (Event, Value<u32>)) {
    let (e, waiting) = args;
    *waiting.lock() += 1;
    if !e.wait_timeout(LONG) {
        std::process::exit(3);
    }
}

fn event_wakes_every_waiter(m: StartMethod) {
    let e = Event::new().unwrap();
    let waiting = Value::new(0u32).unwrap();
    let ctx = get_context(m);
    let r = Reaper::start(
        m,
        (0..3)
            .map(|_| ctx.process(wait_for_event, (e.clone(), waiting.clone())))
            .collect(),
    );
    assert!(wait_until(LONG, || waiting.get() == 3));
    assert!(!e.is_set());
    assert!(!e.wait_timeout(Duration::from_millis(10)));
    e.set();
    assert_eq!(r.join_all(), [0; 3], "every waiter wakes");
    assert!(e.wait_timeout(Duration::ZERO));
    e.clear();
    assert!(!e.is_set());
}

fn foreign_release(l: RLock) -> (bool, bool) {
    (
        matches!(l.release(), Err(Error::NotOwner)),
        l.try_acquire().is_none(),
    )
}

fn rlock_reentrant_and_owned(m: StartMethod) {
    let l = RLock::new().unwrap();
    let a = l.acquire();
    let b = l.try_acquire().expect("the owner re-enters");
    let c = l
        .acquire_timeout(Duration::ZERO)
        .expect("the owner re-enters");
    assert_eq!(l.count(), 3);
    assert!(l.is_owned());
    let (not_owner, busy) = get_context(m)
        .spawn(foreign_release, l.clone())
        .unwrap()
        .join()
        .unwrap();
    assert!(not_owner, "another process may not release our RLock");
    assert!(busy, "another process may not take our RLock");
    drop((c, b));
    assert_eq!(l.count(), 1);
    // A leaked level, released by the owner.
    std::mem::forget(a);
    l.release().unwrap();
    assert_eq!(l.count(), 0);
    assert!(matches!(l.release(), Err(Error::NotOwner)));
}

/// Takes the lock, tells the parent, and blocks until killed.
fn hold_and_hang(args: (Lock, Event, Event)) {
    let (lock, held, never) = args;
    std::mem::forget(lock.acquire());
    held.set();
    never.wait();
}

/// A holder SIGKILLed while holding a `Lock` is taken over by a waiter, whose guard says
/// so. The parent takes the lock once first, so that a child made by `fork` or by the
/// forkserver starts with its parent's identity cached: the child must still be recorded
/// as a holder of its own (else the parent would see itself as the holder and wait for
/// ever).
fn lock_holder_killed(m: StartMethod) {
    let lock = Lock::new().unwrap();
    drop(lock.acquire());
    let (held, never) = (Event::new().unwrap(), Event::new().unwrap());
    let r = Reaper::start(
        m,
        vec![get_context(m).process(hold_and_hang, (lock.clone(), held.clone(), never))],
    );
    assert!(held.wait_timeout(LONG));
    assert!(lock.is_locked());
    assert!(matches!(
        lock.acquire_timeout(Duration::from_millis(20)),
        Err(Error::Timeout { .. })
    ));
    r.0[0].kill().unwrap();
    assert_eq!(r.join_all(), [-9]);
    let g = lock
        .acquire_timeout(LONG)
        .expect("a dead holder must not block the lock");
    assert!(g.owner_died(), "the guard must say the holder died");
    drop(g);
    let g = lock.acquire();
    assert!(!g.owner_died(), "once recovered, the lock is clean again");
}

fn hold_value_and_hang(args: (Value<u64>, Event, Event)) {
    let (v, held, never) = args;
    let mut g = v.lock();
    *g = 7;
    std::mem::forget(g);
    held.set();
    never.wait();
}

/// Waits for the value's lock (blocked behind a holder that will die); exit code 10 if
/// the guard reported the death, 11 if not.
fn wait_for_value(args: (Value<u64>, Event)) {
    let (v, waiting) = args;
    waiting.set();
    let mut g = v.lock_timeout(LONG).unwrap();
    *g += 1;
    std::process::exit(if g.owner_died() { 10 } else { 11 });
}

fn value_holder_killed_while_others_wait(m: StartMethod) {
    let v = Value::new(0u64).unwrap();
    let (held, never, waiting) = (
        Event::new().unwrap(),
        Event::new().unwrap(),
        Event::new().unwrap(),
    );
    let ctx = get_context(m);
    let holder = Reaper::start(
        m,
        vec![ctx.process(hold_value_and_hang, (v.clone(), held.clone(), never))],
    );
    assert!(held.wait_timeout(LONG));
    let waiter = Reaper::start(
        m,
        vec![ctx.process(wait_for_value, (v.clone(), waiting.clone()))],
    );
    assert!(waiting.wait_timeout(LONG));
    holder.0[0].kill().unwrap();
    assert_eq!(holder.join_all(), [-9]);
    assert_eq!(
        waiter.join_all(),
        [10],
        "the waiting process takes over and is told"
    );
    assert_eq!(v.get(), 8);
}

fn hold_rlock_twice_and_hang(args: (RLock, Event, Event)) {
    let (lock, held, never) = args;
    std::mem::forget(lock.acquire());
    std::mem::forget(lock.acquire());
    held.set();
    never.wait();
}

fn rlock_holder_killed(m: StartMethod) {
    let lock = RLock::new().unwrap();
    let (held, never) = (Event::new().unwrap(), Event::new().unwrap());
    let r = Reaper::start(
        m,
        vec![get_context(m).process(
            hold_rlock_twice_and_hang,
            (lock.clone(), held.clone(), never),
        )],
    );
    assert!(held.wait_timeout(LONG));
    assert_eq!(lock.count(), 2);
    assert!(!lock.is_owned());
    r.0[0].kill().unwrap();
    assert_eq!(r.join_all(), [-9]);
    let g = lock.acquire_timeout(LONG).expect("taken over");
    assert!(g.owner_died());
    assert_eq!(lock.count(), 1, "the count starts afresh");
    drop(g);
    assert_eq!(lock.count(), 0);
}

/// Exit code 20 if the wait ended with BrokenBarrier.
fn wait_at_barrier(b: Barrier) {
    match b.wait_timeout(LONG) {
        Err(Error::BrokenBarrier) => std::process::exit(20),
        Ok(_) => std::process::exit(21),
        Err(_) => std::process::exit(22),
    }
}

fn barrier_party_killed(m: StartMethod) {
    let b = Barrier::new(3).unwrap();
    let ctx = get_context(m);
    let victim = Reaper::start(m, vec![ctx.process(wait_at_barrier, b.clone())]);
    assert!(wait_until(LONG, || b.n_waiting() == 1));
    let other = Reaper::start(m, vec![ctx.process(wait_at_barrier, b.clone())]);
    assert!(wait_until(LONG, || b.n_waiting() == 2));
    victim.0[0].kill().unwrap();
    assert_eq!(victim.join_all(), [-9]);
    assert_eq!(
        other.join_all(),
        [20],
        "the surviving party must learn that the barrier broke"
    );
    assert!(b.broken());
    assert!(matches!(b.wait(), Err(Error::BrokenBarrier)));
    b.reset();
    assert!(!b.broken());
    // Usable again.
    let again = Barrier::new(1).unwrap();
    assert_eq!(again.wait().unwrap(), 0);
}

/// Waits on the condition for the flag; exit 0 when it came.
fn wait_for_flag(args: (Condition, RawValue<u32>, RawValue<u32>)) {
    let (cond, waiting, flag) = args;
    let mut g = cond.acquire();
    waiting.set(waiting.get() + 1);
    if g.wait_for_timeout(LONG, || flag.get() == 1).is_err() {
        std::process::exit(3);
    }
}

fn condition_waiter_killed(m: StartMethod) {
    let cond = Condition::new().unwrap();
    let (waiting, flag) = (RawValue::new(0u32).unwrap(), RawValue::new(0u32).unwrap());
    let ctx = get_context(m);
    let args = (cond.clone(), waiting.clone(), flag.clone());
    let victim = Reaper::start(m, vec![ctx.process(wait_for_flag, args.clone())]);
    let other = Reaper::start(m, vec![ctx.process(wait_for_flag, args)]);
    // Once we hold the lock and both have counted themselves, both are inside wait.
    assert!(wait_until(LONG, || {
        let _g = cond.acquire();
        waiting.get() == 2
    }));
    victim.0[0].kill().unwrap();
    assert_eq!(victim.join_all(), [-9]);
    {
        let _g = cond.acquire();
        flag.set(1);
        cond.notify(1);
    }
    assert_eq!(other.join_all(), [0], "the live waiter is woken");
}

// ---- single-process behaviour ----

#[test]
fn lock_timeout_try_and_release() {
    let l = Lock::new().unwrap();
    assert!(matches!(l.release(), Err(Error::ReleasedTooOften)));
    let g = l.try_acquire().unwrap();
    assert!(l.try_acquire().is_none());
    let t = Instant::now();
    assert!(matches!(
        l.acquire_timeout(Duration::from_millis(30)),
        Err(Error::Timeout { .. })
    ));
    assert!(t.elapsed() >= Duration::from_millis(30));
    std::mem::forget(g);
    l.release().unwrap();
    assert!(!l.is_locked());
}

#[test]
fn lock_between_threads() {
    let l = Lock::new().unwrap();
    let v = Value::new(0u64).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..10_000 {
                    let _g = l.acquire();
                    v.set_raw(v.get_raw() + 1);
                }
            });
        }
    });
    assert_eq!(v.get(), 40_000);
}

#[test]
fn a_thread_that_ends_holding_a_lock_is_a_dead_holder() {
    let l = Lock::new().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| std::mem::forget(l.acquire()));
    });
    let g = l.acquire_timeout(LONG).expect("taken over");
    assert!(g.owner_died());
    drop(g);
    let r = RLock::new().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| std::mem::forget(r.acquire()));
    });
    assert!(!r.is_owned());
    assert!(matches!(r.release(), Err(Error::NotOwner)));
    assert!(r.acquire_timeout(LONG).unwrap().owner_died());
}

#[test]
fn bounded_semaphore_over_release() {
    let s = BoundedSemaphore::new(2).unwrap();
    assert!(matches!(s.release(), Err(Error::ReleasedTooOften)));
    let a = s.acquire();
    let b = s.acquire_timeout(Duration::from_millis(1)).unwrap();
    assert!(s.try_acquire().is_none());
    assert!(matches!(
        s.acquire_timeout(Duration::from_millis(10)),
        Err(Error::Timeout { .. })
    ));
    b.forget();
    s.release().unwrap();
    drop(a);
    assert_eq!(s.get_value(), 2);
    assert!(matches!(s.release(), Err(Error::ReleasedTooOften)));
    // A plain semaphore has no bound.
    let p = Semaphore::new(0).unwrap();
    p.release();
    p.release();
    assert_eq!(p.get_value(), 2);
}

#[test]
fn barrier_timeout_abort_and_bad_input() {
    assert!(matches!(Barrier::new(0), Err(Error::InvalidArgument(_))));
    let b = Barrier::new(2).unwrap();
    assert!(matches!(
        b.wait_timeout(Duration::from_millis(20)),
        Err(Error::BrokenBarrier)
    ));
    assert!(b.broken());
    b.reset();
    b.abort();
    assert!(matches!(b.wait(), Err(Error::BrokenBarrier)));
}

#[test]
fn received_with_the_wrong_type_is_an_error() {
    let (a, b) = pipe().unwrap();
    a.send(&Value::new(1u8).unwrap()).unwrap();
    match b.recv::<Value<u64>>() {
        Err(Error::Serialization(msg)) => assert!(msg.contains("expected 8"), "{msg}"),
        other => panic!("expected a serialization error, got {other:?}"),
    }
    a.send(&Event::new().unwrap()).unwrap();
    assert!(matches!(b.recv::<Lock>(), Err(Error::Serialization(_))));
    // A Value's lock travels as a Lock.
    let v = Value::new(5u32).unwrap();
    a.send(&v.get_lock()).unwrap();
    let l: Lock = b.recv().unwrap();
    let g = l.acquire();
    assert!(v.try_lock().is_none());
    drop(g);
    assert_eq!(v.get(), 5);
}

#[test]
fn arrays_index_and_bad_input() {
    let a = Array::<u16>::zeroed(3).unwrap();
    a.set(2, 7).unwrap();
    assert_eq!(a.get(2), Some(7));
    assert_eq!(a.get(3), None);
    assert!(matches!(a.set(3, 1), Err(Error::InvalidArgument(_))));
    let r = RawArray::from_slice(&[1.5f64, 2.5]).unwrap();
    assert_eq!((r.len(), r.get(1), r.get(2)), (2, Some(2.5), None));
    assert!(matches!(r.set(2, 0.0), Err(Error::InvalidArgument(_))));
    let empty = Array::<u8>::zeroed(0).unwrap();
    assert!(empty.is_empty() && empty.to_vec().is_empty());
    #[derive(Clone, Copy)]
    #[repr(C, align(128))]
    struct Wide([u8; 128]);
    // SAFETY: a byte array with no padding: any bits are valid.
    #[allow(unsafe_code)]
    unsafe impl bytemuck::Zeroable for Wide {}
    // SAFETY: as above; Copy, 'static, no padding, no pointers.
    #[allow(unsafe_code)]
    unsafe impl bytemuck::Pod for Wide {}
    assert!(matches!(
        Value::new(Wide([0; 128])),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn condition_timeout() {
    let c = Condition::new().unwrap();
    let mut g = c.acquire();
    assert!(!g.wait_timeout(Duration::from_millis(20)));
    assert!(matches!(
        g.wait_for_timeout(Duration::from_millis(20), || false),
        Err(Error::Timeout { .. })
    ));
    drop(g);
    assert!(!c.lock().is_locked());
}

fn _assert_send_sync() {
    fn ok<T: Send + Sync + Clone>() {}
    ok::<Lock>();
    ok::<RLock>();
    ok::<Semaphore>();
    ok::<Condition>();
    ok::<Event>();
    ok::<Barrier>();
    ok::<Value<u64>>();
    ok::<Array<f32>>();
    ok::<RawValue<u8>>();
    ok::<RawArray<u8>>();
    let _ = Process::new(|| {}, ());
}
