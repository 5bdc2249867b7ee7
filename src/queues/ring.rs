//! The shared ring behind every queue: the one file of the queue module with `unsafe`
//! (raw access to the shared mapping), each block with its `// SAFETY:` argument.
//!
//! # Layout
//! A memfd mapping: a 4 KiB header, then a data ring of `cap` bytes (a power of two).
//! Positions (`head`, `tail`) are byte counters that only grow; `pos % cap` is the offset.
//!
//! The data is a sequence of *chunks*, each 16-byte aligned and never straddling the end of
//! the ring: a 16-byte chunk header (`u32` payload length, `u32` flags, `u64` item id) and
//! the payload. An item is one chunk (flags `FIRST|LAST`) or, when it is larger than the
//! free space, several (`FIRST`, ..., `LAST`) streamed through the ring while the consumer
//! drains it. `PAD` chunks fill the end of the ring when a small item is moved to its start.
//!
//! # Protocol
//! * One producer at a time holds the *producer lock*, one consumer at a time the
//!   *consumer lock* (the crate's crash-safe lock word, see `sys::robust`). Between them the
//!   ring is single-producer single-consumer: the producer writes bytes past `tail` and
//!   publishes them by storing `tail` (release); the consumer reads bytes before `tail`
//!   and frees them by storing `head` (release).
//! * Items are encoded by serde straight into the ring (no intermediate buffer) and decoded
//!   straight out of it. A small item is published only when complete, so a producer that
//!   dies (or times out, or fails to encode) leaves nothing visible: the next producer
//!   simply writes over the unpublished bytes. A large item publishes chunks as it goes; if
//!   its producer stops half-way (death, timeout, encode error), the item is *aborted*: the
//!   consumer discards what it took of it, and never hands out a partial item.
//! * A consumer advances `head` only past chunks it has fully read. A consumer killed while
//!   reading a small item leaves it in place for the next one; killed inside a large item,
//!   it loses that item only: the next consumer skips the rest of it (continuation chunks
//!   without their `FIRST`).
//! * Sleeping uses futexes with a waiter count (or wanted position), so the fast paths make
//!   no system call.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use crate::reduction::codec::{self, CodecError};
use crate::reduction::decode_exact;
use crate::sys::futex::{self, Wake};
use crate::sys::ident::{self, Holder};
use crate::sys::robust::{slice_end, Locked, RobustLock, CHECK_INTERVAL};
use crate::sys::shm::Mapping;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

const MAGIC: u64 = u64::from_le_bytes(*b"mpqueue1");
const HEADER_BYTES: usize = 4096;
const HDR: u64 = 16;
const FIRST: u32 = 1;
const LAST: u32 = 2;
const PAD: u32 = 4;
/// In-flight slots of a joinable queue (items taken and not yet marked done that can be
/// given to another consumer if their taker dies), and the largest encoded item a slot
/// keeps a copy of. Each slot's copy lives after the ring.
pub(crate) const SLOTS: usize = 64;
pub(crate) const SLOT_BYTES: usize = 32 * 1024;
const SLOT_AREA: usize = SLOTS * SLOT_BYTES;
/// Slot `state` bits (valid while `owner` is not 0; written before `owner` on a claim).
const PREPARING: u64 = 1 << 62;
const HELD: u64 = 1 << 61;
const COPY: u64 = 1 << 60;
const LEN_MASK: u64 = (1 << 32) - 1;
/// Slot `owner` of an item whose taker died and that cannot be delivered again.
const LOST: u64 = u64::MAX;
/// Smallest and largest ring sizes accepted.
pub(crate) const MIN_CAPACITY: usize = 64 * 1024;
pub(crate) const MAX_CAPACITY: usize = 1 << 30;

#[repr(C, align(64))]
struct Line<T>(T);

#[repr(C)]
struct Fixed {
    magic: AtomicU64,
    capacity: AtomicU64,
    maxsize: AtomicU64,
    joinable: AtomicU64,
}

/// Written only by the producer holding the lock.
#[repr(C)]
struct Prod {
    tail: AtomicU64,
    put_count: AtomicU64,
    next_item: AtomicU64,
    /// The item whose chunks are being streamed (0: none).
    writing_item: AtomicU64,
    /// The last item abandoned after some of its chunks were published.
    abort_item: AtomicU64,
    /// Redo log of the commit of an item's last chunk: the `tail` and `put_count` it
    /// publishes (`log_tail` 0: no commit in progress). See `commit_item`.
    log_tail: AtomicU64,
    log_put: AtomicU64,
}

/// Written only by the consumer holding the lock.
#[repr(C)]
struct Cons {
    head: AtomicU64,
    got_count: AtomicU64,
    /// Redo log of a `consume` (`log_head` 0: none in progress), with the in-flight slot
    /// it arms (index + 1, 0: none).
    log_head: AtomicU64,
    log_got: AtomicU64,
    log_slot: AtomicU64,
}

/// An item taken from a joinable queue and not yet marked done.
#[repr(C)]
struct Slot {
    /// 0: free; the taker's identity; or [`LOST`].
    owner: AtomicU64,
    /// [`PREPARING`] (being taken, under the consumer lock) or [`HELD`], with [`COPY`]
    /// and the copy's length when the slot data holds the item's bytes.
    state: AtomicU64,
    /// Where the item began in the ring (to tell, after a taker's death, whether it
    /// had moved `head` past any of it).
    pos: AtomicU64,
}

#[repr(C)]
struct DataWake {
    seq: AtomicU32,
    waiters: AtomicU32,
}

#[repr(C)]
struct SpaceWake {
    seq: AtomicU32,
    _pad: u32,
    /// A producer sleeps until `head >= want_head` (0: nobody).
    want_head: AtomicU64,
    /// A producer sleeps until `got_count >= want_got` (0: nobody).
    want_got: AtomicU64,
}

#[repr(C)]
struct Header {
    fixed: Line<Fixed>,
    prod_lock: Line<RobustLock>,
    cons_lock: Line<RobustLock>,
    prod: Line<Prod>,
    cons: Line<Cons>,
    data: Line<DataWake>,
    space: Line<SpaceWake>,
    tasks: Line<Tasks>,
    slots: Line<[Slot; SLOTS]>,
}

/// A joinable queue's task count: unfinished = `put_count - done`, so that a process
/// killed at any point leaves it exact (`put_count` is committed with the item).
#[repr(C)]
struct Tasks {
    done: AtomicU64,
    /// Bumped when `done` catches up with `put_count`; what `join` sleeps on.
    seq: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// What `put` did.
pub(crate) enum Put {
    Done,
    /// No room (items or bytes) before the deadline; nothing was published.
    Full,
}

/// The shared ring, mapped in this process.
pub(crate) struct Ring {
    map: Mapping,
    cap: u64,
    /// This process's last view of `head` (producer side) and `tail` (consumer side);
    /// only touched under the matching lock.
    seen_head: AtomicU64,
    seen_tail: AtomicU64,
    /// When this process last probed the takers of in-flight items (ms since `EPOCH`).
    last_probe: AtomicU64,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("capacity", &self.cap)
            .field("map", &self.map)
            .finish()
    }
}

/// Unlocks on drop (also when a serde impl panics mid-item).
struct Unlock<'a>(&'a RobustLock);

impl Drop for Unlock<'_> {
    fn drop(&mut self) {
        self.0.unlock();
    }
}

impl Ring {
    /// A new ring of `capacity` bytes (rounded up to a power of two, clamped to the
    /// accepted range).
    pub(crate) fn create(capacity: usize, maxsize: u64, joinable: bool) -> Result<Ring> {
        let cap = capacity
            .clamp(MIN_CAPACITY, MAX_CAPACITY)
            .next_power_of_two();
        let slots = if joinable { SLOT_AREA } else { 0 };
        let map = Mapping::anonymous(c"multiprocess-queue", HEADER_BYTES + cap + slots)?;
        let ring = Ring::wrap(map, cap as u64);
        let h = ring.header();
        h.fixed.0.capacity.store(cap as u64, Relaxed);
        h.fixed.0.maxsize.store(maxsize, Relaxed);
        h.fixed.0.joinable.store(joinable as u64, Relaxed);
        h.fixed.0.magic.store(MAGIC, Release);
        Ok(ring)
    }

    fn wrap(map: Mapping, cap: u64) -> Ring {
        Ring {
            map,
            cap,
            seen_head: AtomicU64::new(0),
            seen_tail: AtomicU64::new(0),
            last_probe: AtomicU64::new(0),
        }
    }

    /// A ring from a mapping that arrived from another process; checked, never trusted.
    pub(crate) fn from_mapping(map: Mapping) -> std::result::Result<Ring, String> {
        if map.len() < HEADER_BYTES + MIN_CAPACITY {
            return Err(format!(
                "a queue's shared memory is too small ({} bytes)",
                map.len()
            ));
        }
        let ring = Ring::wrap(map, 0);
        let h = ring.header();
        if h.fixed.0.magic.load(Acquire) != MAGIC {
            return Err("the shared memory is not a queue".into());
        }
        let cap = h.fixed.0.capacity.load(Relaxed);
        let slots = if h.fixed.0.joinable.load(Relaxed) != 0 {
            SLOT_AREA as u64
        } else {
            0
        };
        if !cap.is_power_of_two()
            || cap > MAX_CAPACITY as u64
            || HEADER_BYTES as u64 + cap + slots != ring.map.len() as u64
        {
            return Err(format!(
                "a queue's shared memory has a bad capacity ({cap})"
            ));
        }
        Ok(Ring { cap, ..ring })
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_BYTES long (checked at creation and on
        // arrival) and page-aligned, so the Header (which fits in HEADER_BYTES, asserted
        // above, and needs 64-byte alignment) lies inside it. Its fields are atomics and a
        // pthread mutex in an UnsafeCell, which other processes may change at any time
        // through the same shared pages; all zero bytes (a fresh memfd) are a valid value
        // for the atomics, and the mutexes are initialised before the magic is published.
        unsafe { &*self.map.as_ptr().cast::<Header>() }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HEADER_BYTES is inside the mapping (see `header`).
        unsafe { self.map.as_ptr().add(HEADER_BYTES) }
    }

    fn off(&self, pos: u64) -> usize {
        (pos & (self.cap - 1)) as usize
    }

    /// Copies `src` into the ring at `pos`; the range must not cross the end of the ring
    /// and must lie in the producer's unpublished space.
    fn write_at(&self, pos: u64, src: &[u8]) {
        let o = self.off(pos);
        assert!(o + src.len() <= self.cap as usize);
        // SAFETY: in bounds (asserted). The bytes lie between `tail` and `head + cap`,
        // which only the producer holding the lock touches; the consumer reads nothing
        // there until `tail` is published (release) past them.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.data().add(o), src.len()) }
    }

    /// Copies out of the ring at `pos`; the range must lie in the published, unconsumed
    /// part (between `head` and `tail`), not crossing the end.
    fn read_at(&self, pos: u64, dst: &mut [u8]) {
        // SAFETY: `u8` and `MaybeUninit<u8>` have the same layout, and only initialised
        // bytes are written through the view.
        let dst = unsafe { &mut *(dst as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
        self.read_at_uninit(pos, dst)
    }

    /// [`read_at`](Self::read_at) into memory not yet initialised.
    fn read_at_uninit(&self, pos: u64, dst: &mut [std::mem::MaybeUninit<u8>]) {
        let o = self.off(pos);
        assert!(o + dst.len() <= self.cap as usize);
        // SAFETY: in bounds (asserted). Published bytes are not written again until the
        // consumer holding the lock moves `head` past them, which it does only after this
        // copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.data().add(o),
                dst.as_mut_ptr().cast::<u8>(),
                dst.len(),
            )
        }
    }

    /// Runs `f` on the published bytes `[pos, pos + len)` (not crossing the end).
    fn with_slice<R>(&self, pos: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let o = self.off(pos);
        assert!(o + len <= self.cap as usize);
        // SAFETY: as in `read_at`: the bytes are published and stay unchanged until the
        // consumer (us, holding the lock) moves `head` past them, after `f` returns; the
        // slice does not escape `f`.
        let s = unsafe { std::slice::from_raw_parts(self.data().add(o), len) };
        f(s)
    }

    /// Moves `len` unpublished bytes within the producer's space.
    fn move_within(&self, from: u64, to: u64, len: u64) {
        let (f, t, n) = (self.off(from), self.off(to), len as usize);
        assert!(f + n <= self.cap as usize && t + n <= self.cap as usize);
        // SAFETY: both ranges are in bounds (asserted) and in the producer's unpublished
        // space (see `write_at`); `copy` allows overlap.
        unsafe { std::ptr::copy(self.data().add(f), self.data().add(t), n) }
    }

    fn write_chunk_header(&self, pos: u64, len: u64, flags: u32, item: u64) {
        let mut h = [0u8; HDR as usize];
        h[..4].copy_from_slice(&(len as u32).to_le_bytes());
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..].copy_from_slice(&item.to_le_bytes());
        self.write_at(pos, &h);
    }

    /// `(payload length, flags, item)` of the published chunk at `pos`, checked against
    /// the ring (a corrupt header is a protocol error, not a wild read).
    fn read_chunk_header(&self, pos: u64) -> Result<(u64, u32, u64)> {
        let mut h = [0u8; HDR as usize];
        self.read_at(pos, &mut h);
        let len = u32::from_le_bytes(h[..4].try_into().unwrap()) as u64;
        let flags = u32::from_le_bytes(h[4..8].try_into().unwrap());
        let item = u64::from_le_bytes(h[8..].try_into().unwrap());
        if self.off(pos) as u64 + HDR + align16(len) > self.cap {
            return Err(Error::protocol("corrupt queue chunk header"));
        }
        Ok((len, flags, item))
    }

    pub(crate) fn maxsize(&self) -> u64 {
        self.header().fixed.0.maxsize.load(Relaxed)
    }

    pub(crate) fn joinable(&self) -> bool {
        self.header().fixed.0.joinable.load(Relaxed) != 0
    }

    /// Items put and not yet taken (approximate while others work on the queue).
    pub(crate) fn len(&self) -> u64 {
        let h = self.header();
        let got = h.cons.0.got_count.load(Acquire);
        let put = h.prod.0.put_count.load(Acquire);
        put.saturating_sub(got)
    }

    fn min_split(&self) -> u64 {
        self.cap / 16
    }

    // ------------------------------------------------------------------ wakeups

    fn wake_consumer(&self) {
        let d = &self.header().data.0;
        fence(SeqCst);
        if d.waiters.load(Relaxed) > 0 {
            d.seq.fetch_add(1, Release);
            futex::wake_all(&d.seq);
        }
    }

    /// After the consumer freed space or took an item: wakes a producer that waits for it.
    fn wake_producer(&self, head: u64, got: u64) {
        let s = &self.header().space.0;
        fence(SeqCst);
        let wh = s.want_head.load(Relaxed);
        let wg = s.want_got.load(Relaxed);
        if (wh != 0 && head >= wh) || (wg != 0 && got >= wg) {
            s.want_head.store(0, Relaxed);
            s.want_got.store(0, Relaxed);
            s.seq.fetch_add(1, Release);
            futex::wake_all(&s.seq);
        }
    }

    /// Producer: sleeps until `cond()` holds or the deadline passes. `arm` records what the
    /// producer waits for, so that the consumer wakes it only then.
    fn producer_wait(
        &self,
        deadline: Option<Instant>,
        arm: impl Fn(&SpaceWake),
        cond: impl Fn() -> bool,
    ) -> bool {
        let s = &self.header().space.0;
        if spin_until(deadline, &cond) {
            return true;
        }
        loop {
            arm(s);
            let seq = s.seq.load(SeqCst);
            fence(SeqCst);
            if cond() {
                return true;
            }
            if futex::wait(&s.seq, seq, deadline) == Wake::TimedOut {
                return cond();
            }
            if cond() {
                return true;
            }
        }
    }

    /// Consumer: waits until a chunk is published at `head` or the deadline passes.
    fn consumer_wait(&self, head: u64, deadline: Option<Instant>) -> bool {
        let h = self.header();
        let ready = || {
            if self.seen_tail.load(Relaxed) > head {
                return true;
            }
            let t = h.prod.0.tail.load(Acquire);
            self.seen_tail.store(t, Relaxed);
            t > head
        };
        if ready() || spin_until(deadline, ready) {
            return true;
        }
        let d = &h.data.0;
        loop {
            d.waiters.fetch_add(1, SeqCst);
            let seq = d.seq.load(SeqCst);
            let r = if ready() {
                Wake::Woken
            } else {
                futex::wait(&d.seq, seq, deadline)
            };
            d.waiters.fetch_sub(1, SeqCst);
            if ready() {
                return true;
            }
            if r == Wake::TimedOut {
                return false;
            }
        }
    }

    // ------------------------------------------------------------------ producer

    /// Completes or undoes what a producer that died holding the lock left half-done: an
    /// item whose commit had begun is published (all its bytes were written before the
    /// log), a streamed item that had not reached its commit is aborted.
    fn recover_producer(&self) {
        let p = &self.header().prod.0;
        let logged = p.log_tail.load(Acquire);
        if logged != 0 {
            self.apply_commit(logged, p.log_put.load(Relaxed));
            p.writing_item.store(0, Relaxed);
            self.wake_consumer();
        }
        let w = p.writing_item.load(Relaxed);
        if w != 0 {
            p.abort_item.store(w, Release);
            p.writing_item.store(0, Relaxed);
            self.wake_consumer();
        }
    }

    /// Publishes a whole item ending at `end` as the `put`-th: a redo log first, so that a
    /// producer killed between the two stores leaves `tail` and `put_count` (and so the
    /// task count of a joinable queue) for the next producer to complete, never apart.
    fn commit_item(&self, end: u64, put: u64) {
        let p = &self.header().prod.0;
        p.log_put.store(put, Relaxed);
        p.log_tail.store(end, Release);
        self.apply_commit(end, put);
        p.log_tail.store(0, Release);
    }

    fn apply_commit(&self, end: u64, put: u64) {
        let p = &self.header().prod.0;
        // Counted before it is visible: a consumer's task_done never runs ahead of it.
        p.put_count.store(put, Release);
        p.tail.store(end, Release);
    }

    /// Encodes `item` into the ring. `deadline` bounds the waits for the lock and for
    /// room; once a large item has begun streaming, running out of time aborts it (the
    /// consumer discards its part) and reports `Full`.
    pub(crate) fn put<T: Serialize + ?Sized>(
        &self,
        item: &T,
        deadline: Option<Instant>,
    ) -> Result<Put> {
        let h = self.header();
        let Some(locked) = h.prod_lock.0.lock(deadline) else {
            return Ok(Put::Full);
        };
        let _unlock = Unlock(&h.prod_lock.0);
        if locked == Locked::OwnerDied {
            self.recover_producer();
        }
        let p = &h.prod.0;
        let maxsize = self.maxsize();
        if maxsize > 0 {
            let put = p.put_count.load(Relaxed);
            let room = || put.saturating_sub(h.cons.0.got_count.load(Acquire)) < maxsize;
            let armed = |s: &SpaceWake| s.want_got.store((put + 1 - maxsize).max(1), SeqCst);
            if !self.producer_wait(deadline, armed, room) {
                return Ok(Put::Full);
            }
        }
        let item_id = p.next_item.load(Relaxed) + 1;
        p.next_item.store(item_id, Relaxed);
        let tail = p.tail.load(Relaxed);
        let mut w = Writer {
            ring: self,
            item: item_id,
            tail,
            chunk: tail,
            pos: tail + HDR,
            end: tail + HDR,
            first: true,
            deadline,
            timed_out: false,
        };
        // Room for the first chunk's header.
        if !w.wait_room(tail + HDR, tail + HDR) {
            return Ok(Put::Full);
        }
        w.refresh_end();
        match codec::encode_into(&mut w, item) {
            Ok(()) => {
                w.finish();
                Ok(Put::Done)
            }
            Err(e) => {
                let timed_out = w.timed_out;
                w.abandon();
                if timed_out {
                    Ok(Put::Full)
                } else {
                    Err(Error::serialization(e))
                }
            }
        }
    }

    // ------------------------------------------------------------------ consumer

    /// Takes one item. `Ok(None)`: nothing arrived before the deadline. A corrupt or
    /// mistyped item is consumed and reported as an error.
    pub(crate) fn get<T: DeserializeOwned>(&self, deadline: Option<Instant>) -> Result<Option<T>> {
        self.take(deadline, Decode(std::marker::PhantomData::<T>))
    }

    /// Takes one item as its encoded bytes, copied into `buf` (cleared first, its memory
    /// reused): one copy out of the ring, nothing decoded. `Ok(None)` as for [`get`](Self::get).
    pub(crate) fn get_raw(
        &self,
        deadline: Option<Instant>,
        buf: &mut Vec<u8>,
    ) -> Result<Option<()>> {
        self.take(deadline, Raw(buf))
    }

    fn take<K: Take>(&self, deadline: Option<Instant>, mut how: K) -> Result<Option<K::Out>> {
        let h = self.header();
        // A consumer that died holding the lock leaves at most a logged `consume` to
        // complete: `head` only moves at chunk boundaries, and the rest of an item it was
        // inside is skipped below as orphan continuation chunks.
        let Some(locked) = h.cons_lock.0.lock(deadline) else {
            return Ok(None);
        };
        let _unlock = Unlock(&h.cons_lock.0);
        if locked == Locked::OwnerDied {
            self.recover_consumer();
        }
        let c = &h.cons.0;
        let mut head = c.head.load(Relaxed);
        let joinable = self.joinable();
        loop {
            if joinable && self.probe_due() {
                if let Some(res) = self.redeliver(&mut how) {
                    return res.map(Some);
                }
            }
            // A joinable queue's getter wakes now and then to look for items whose taker
            // died (see `redeliver`).
            let until = if joinable {
                Some(slice_end(deadline))
            } else {
                deadline
            };
            if !self.consumer_wait(head, until) {
                if until != deadline && deadline.is_none_or(|d| Instant::now() < d) {
                    continue;
                }
                return Ok(None);
            }
            let (len, flags, item) = self.read_chunk_header(head)?;
            let next = head + HDR + align16(len);
            if flags & PAD != 0 {
                head = next;
                self.consume(head, false, None);
                continue;
            }
            if flags & FIRST == 0 {
                // The rest of an item whose first part a dead consumer took.
                head = next;
                self.consume(head, flags & LAST != 0, None);
                continue;
            }
            let slot = if joinable {
                self.prepare_slot(head, len, flags & LAST != 0)
            } else {
                None
            };
            if flags & LAST != 0 {
                let res = self.with_slice(head + HDR, len as usize, |b| how.whole(b));
                head = next;
                self.consume(head, true, slot);
                return res.map(Some);
            }
            let mut r = Reader {
                ring: self,
                item,
                head,
                pos: head + HDR,
                end: head + HDR + len,
                last: false,
                aborted: false,
                read: 0,
            };
            let res = how.streamed(&mut r);
            let whole = r.last && r.pos == r.end;
            if !r.aborted {
                r.skip_rest();
            }
            head = r.head;
            if r.aborted {
                // Never counted (its producer did not commit it): nothing is in flight.
                if let Some(i) = slot {
                    self.free_slot(i);
                }
                continue;
            }
            head += HDR + align16(r.end - r.head - HDR);
            self.consume(head, true, slot);
            return match res {
                Ok(v) if whole => Ok(Some(v)),
                Ok(_) => Err(Error::Serialization(
                    "type mismatch: the item is longer than the type read from the queue".into(),
                )),
                Err(e) => Err(e),
            };
        }
    }

    /// Moves `head` (consumer side), counting a taken item if `item_done` and arming its
    /// in-flight `slot`; through a redo log, so that `head`, `got_count` and the slot
    /// never drift apart (see `commit_item`).
    fn consume(&self, head: u64, item_done: bool, slot: Option<usize>) {
        let c = &self.header().cons.0;
        let mut got = c.got_count.load(Relaxed);
        if item_done {
            got += 1;
            c.log_got.store(got, Relaxed);
            c.log_slot.store(slot.map_or(0, |i| i as u64 + 1), Relaxed);
            c.log_head.store(head, Release);
            self.apply_consume(head, got, slot);
            c.log_head.store(0, Release);
        } else {
            c.head.store(head, Release);
        }
        self.wake_producer(head, got);
    }

    fn apply_consume(&self, head: u64, got: u64, slot: Option<usize>) {
        let c = &self.header().cons.0;
        if let Some(i) = slot {
            let st = &self.header().slots.0[i].state;
            let v = st.load(Relaxed);
            st.store((v & !PREPARING) | HELD, Release);
        }
        c.got_count.store(got, Release);
        c.head.store(head, Release);
    }

    /// Completes a `consume` that a consumer killed holding the lock had logged, and
    /// settles the in-flight slot it was preparing: free if the item is still in the
    /// ring, lost if it had moved `head` into a streamed item.
    fn recover_consumer(&self) {
        let h = self.header();
        let c = &h.cons.0;
        let logged = c.log_head.load(Acquire);
        if logged != 0 {
            let got = c.log_got.load(Relaxed);
            let slot = match c.log_slot.load(Relaxed) {
                0 => None,
                i => Some((i - 1) as usize % SLOTS),
            };
            self.apply_consume(logged, got, slot);
            c.log_head.store(0, Release);
            self.wake_producer(logged, got);
        }
        let head = c.head.load(Relaxed);
        for (i, slot) in h.slots.0.iter().enumerate() {
            let owner = slot.owner.load(Acquire);
            if owner == 0 || owner == LOST || slot.state.load(Acquire) & PREPARING == 0 {
                continue;
            }
            if slot.pos.load(Relaxed) == head {
                self.free_slot(i);
            } else {
                let _ = slot.owner.compare_exchange(owner, LOST, AcqRel, Relaxed);
                self.wake_joiners();
            }
        }
    }

    /// Consumer inside a multi-chunk item: waits for its next chunk. `false` when the item
    /// will never complete (its producer timed out, failed or died).
    fn wait_next_chunk(&self, head: u64, item: u64) -> Result<bool> {
        let h = self.header();
        loop {
            if self.consumer_wait(head, Some(Instant::now() + Duration::from_millis(20))) {
                return Ok(true);
            }
            if h.prod.0.abort_item.load(Acquire) == item {
                return Ok(false);
            }
            // Is its producer still there? It holds the producer lock for the whole item.
            if let Some(locked) = h.prod_lock.0.try_lock() {
                let _unlock = Unlock(&h.prod_lock.0);
                if locked == Locked::OwnerDied {
                    self.recover_producer();
                }
                return Ok(self.consumer_wait(head, Some(Instant::now())));
            }
        }
    }

    // ------------------------------------------------------------------ in flight

    fn slot_data(&self, i: usize) -> *mut u8 {
        assert!(i < SLOTS && self.joinable());
        // SAFETY: a joinable queue's mapping holds SLOT_AREA bytes after the ring (checked
        // at creation and on arrival); slot i's data is SLOT_BYTES of it.
        unsafe {
            self.map
                .as_ptr()
                .add(HEADER_BYTES + self.cap as usize + i * SLOT_BYTES)
        }
    }

    /// Consumer, under the lock, about to take the item whose first chunk is at `head`:
    /// claims an in-flight slot for it (with a copy of its bytes if it is one chunk that
    /// fits). `None` if every slot is taken: the item is then delivered untracked.
    fn prepare_slot(&self, head: u64, len: u64, whole: bool) -> Option<usize> {
        let me = ident::me().word();
        let slots = &self.header().slots.0;
        let i = slots.iter().position(|s| s.owner.load(Relaxed) == 0)?;
        let s = &slots[i];
        let mut state = PREPARING;
        if whole && len <= SLOT_BYTES as u64 {
            let dst = self.slot_data(i);
            self.with_slice(head + HDR, len as usize, |src| {
                // SAFETY: the slot's data is SLOT_BYTES >= len bytes inside the mapping
                // (see `slot_data`); a free slot's data is written only by the consumer
                // holding the lock (us), and read only after its owner is set.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
            });
            state |= COPY | len;
        }
        // The state (and position) before the owner: whoever sees the owner sees them.
        s.state.store(state, Release);
        s.pos.store(head, Release);
        // Only consumers holding the lock claim slots: nobody else can take this one.
        s.owner.store(me, Release);
        Some(i)
    }

    fn free_slot(&self, i: usize) {
        self.header().slots.0[i].owner.store(0, Release);
    }

    /// Whether this process should probe the takers of in-flight items again.
    fn probe_due(&self) -> bool {
        let now = now_ms();
        let last = self.last_probe.load(Relaxed);
        now >= last + CHECK_INTERVAL.as_millis() as u64
            && self
                .last_probe
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }

    /// Consumer, under the lock: takes over an in-flight item whose taker is gone and
    /// decodes its kept copy (at-least-once delivery); marks gone takers' items that have
    /// no copy as lost. `None` if there is nothing to deliver again.
    fn redeliver<K: Take>(&self, how: &mut K) -> Option<Result<K::Out>> {
        let me = ident::me();
        for (i, s) in self.header().slots.0.iter().enumerate() {
            let owner = s.owner.load(Acquire);
            let state = s.state.load(Acquire);
            let Some(holder) = Holder::from_word(owner) else {
                continue;
            };
            if owner == LOST || holder == me || state & HELD == 0 || !ident::is_gone(holder) {
                continue;
            }
            if state & COPY == 0 {
                if s.owner
                    .compare_exchange(owner, LOST, AcqRel, Relaxed)
                    .is_ok()
                {
                    self.wake_joiners();
                }
                continue;
            }
            if s.owner
                .compare_exchange(owner, me.word(), AcqRel, Relaxed)
                .is_err()
            {
                continue;
            }
            let len = ((state & LEN_MASK) as usize).min(SLOT_BYTES);
            // SAFETY: the slot's data is SLOT_BYTES bytes inside the mapping; it was
            // written before the slot was armed and is not written again while the slot
            // is held (now by us).
            let bytes = unsafe { std::slice::from_raw_parts(self.slot_data(i), len) };
            return Some(how.whole(bytes));
        }
        None
    }

    /// Joiner: marks as lost the in-flight items without a copy whose takers are gone;
    /// returns how many items are lost.
    fn settle_lost(&self) -> u64 {
        let mut lost = 0;
        for s in &self.header().slots.0 {
            let owner = s.owner.load(Acquire);
            if owner == LOST {
                lost += 1;
                continue;
            }
            let Some(holder) = Holder::from_word(owner) else {
                continue;
            };
            let state = s.state.load(Acquire);
            if state & HELD != 0
                && state & COPY == 0
                && ident::is_gone(holder)
                && s.owner
                    .compare_exchange(owner, LOST, AcqRel, Relaxed)
                    .is_ok()
            {
                lost += 1;
            }
        }
        lost
    }

    /// After `task_done`: frees the in-flight slot it settles — one the calling thread
    /// holds, else a lost one (the caller accounts for it), else any held one.
    fn release_slot(&self) {
        let me = ident::me().word();
        let slots = &self.header().slots.0;
        let held = |s: &Slot| s.state.load(Acquire) & HELD != 0;
        let pick = slots
            .iter()
            .find(|s| s.owner.load(Acquire) == me && held(s))
            .or_else(|| slots.iter().find(|s| s.owner.load(Acquire) == LOST))
            .or_else(|| slots.iter().find(|s| s.owner.load(Acquire) != 0 && held(s)));
        if let Some(s) = pick {
            let owner = s.owner.load(Acquire);
            if owner != 0 {
                let _ = s.owner.compare_exchange(owner, 0, AcqRel, Relaxed);
            }
        }
    }

    fn wake_joiners(&self) {
        let t = &self.header().tasks.0;
        t.seq.fetch_add(1, Release);
        futex::wake_all(&t.seq);
    }

    // ------------------------------------------------------------------ tasks

    /// Items put and not yet marked done (joinable queues).
    pub(crate) fn unfinished(&self) -> u64 {
        let h = self.header();
        let done = h.tasks.0.done.load(Acquire);
        h.prod.0.put_count.load(Acquire).saturating_sub(done)
    }

    /// `task_done`: `false` if there was no unfinished task.
    pub(crate) fn task_done(&self) -> bool {
        let h = self.header();
        let t = &h.tasks.0;
        let put = &h.prod.0.put_count;
        match t.done.fetch_update(AcqRel, Acquire, |d| {
            (d < put.load(Acquire)).then_some(d + 1)
        }) {
            Ok(d) => {
                self.release_slot();
                if d + 1 >= put.load(Acquire) {
                    self.wake_joiners();
                }
                true
            }
            Err(_) => false,
        }
    }

    /// `join`: waits until no task is unfinished. `Ok(false)` if the deadline passed
    /// first; [`Error::TasksLost`] as soon as every unfinished task is an item that a dead
    /// process took and that cannot be delivered again.
    pub(crate) fn join(&self, deadline: Option<Instant>) -> Result<bool> {
        let t = &self.header().tasks.0;
        loop {
            let seq = t.seq.load(Acquire);
            let unfinished = self.unfinished();
            if unfinished == 0 {
                return Ok(true);
            }
            let lost = self.settle_lost();
            if lost >= unfinished {
                return Err(Error::TasksLost { count: unfinished });
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            futex::wait(&t.seq, seq, Some(slice_end(deadline)));
        }
    }
}

/// Milliseconds since this process first asked.
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

// ---------------------------------------------------------------------- async waiters

/// What the async forms of `get` and `put` wait on: the same words and counters as the
/// blocking waits, so producers and consumers in other processes wake them alike.
impl Ring {
    /// Whether a chunk is published past the consumers' head (an item is there, or
    /// arriving).
    pub(crate) fn has_data(&self) -> bool {
        let h = self.header();
        h.prod.0.tail.load(Acquire) > h.cons.0.head.load(Acquire)
    }

    /// The word consumers sleep on; producers wake it while [`Self::count_data_waiter`]
    /// counts anyone.
    pub(crate) fn data_word(&self) -> &AtomicU32 {
        &self.header().data.0.seq
    }

    /// Counts one more (`true`) or one fewer (`false`) consumer waiting on the data word.
    pub(crate) fn count_data_waiter(&self, more: bool) {
        let w = &self.header().data.0.waiters;
        if more {
            w.fetch_add(1, SeqCst);
        } else {
            w.fetch_sub(1, SeqCst);
        }
    }

    /// The word producers sleep on.
    pub(crate) fn space_word(&self) -> &AtomicU32 {
        &self.header().space.0.seq
    }

    /// Asks consumers to wake the space word at their next step (an item taken or space
    /// freed). A blocking producer that asks for more later only delays that wake.
    pub(crate) fn want_any_progress(&self) {
        let h = self.header();
        let s = &h.space.0;
        s.want_head.store(h.cons.0.head.load(Acquire) + 1, SeqCst);
        s.want_got
            .store(h.cons.0.got_count.load(Acquire) + 1, SeqCst);
    }
}

/// Spins briefly (then yields) while `cond` is false; `true` as soon as it holds. Skipped
/// when the deadline has already passed (`try_` forms look once).
fn spin_until(deadline: Option<Instant>, cond: impl Fn() -> bool) -> bool {
    if deadline.is_some_and(|d| d <= Instant::now()) {
        return cond();
    }
    for _ in 0..256 {
        if cond() {
            return true;
        }
        std::hint::spin_loop();
    }
    for _ in 0..2 {
        std::thread::yield_now();
        if cond() {
            return true;
        }
    }
    false
}

/// Encodes straight into the ring (producer side, under the producer lock).
struct Writer<'a> {
    ring: &'a Ring,
    item: u64,
    /// The published tail.
    tail: u64,
    /// Start of the current (unpublished) chunk, its header not yet written.
    chunk: u64,
    /// Next byte to write.
    pos: u64,
    /// How far we may write without looking again (free space, end of the ring).
    end: u64,
    first: bool,
    deadline: Option<Instant>,
    timed_out: bool,
}

impl Writer<'_> {
    /// End of the ring lap that the current chunk starts in.
    fn bound(&self) -> u64 {
        (self.chunk / self.ring.cap + 1) * self.ring.cap
    }

    fn space_end(&self) -> u64 {
        let r = self.ring;
        let seen = r.seen_head.load(Relaxed);
        if seen + r.cap > self.pos {
            return seen + r.cap;
        }
        let head = r.header().cons.0.head.load(Acquire);
        r.seen_head.store(head, Relaxed);
        head + r.cap
    }

    fn refresh_end(&mut self) {
        self.end = self.space_end().min(self.bound());
    }

    /// Waits until the free space reaches `need` (required) — for a blocking put, until it
    /// reaches `want` (a little more, so that producer and consumer do not wake each other
    /// for every item when the ring is full).
    fn wait_room(&mut self, need: u64, want: u64) -> bool {
        let r = self.ring;
        let cap = r.cap;
        let head = || {
            let h = r.header().cons.0.head.load(Acquire);
            r.seen_head.store(h, Relaxed);
            h
        };
        if head() + cap >= need {
            return true;
        }
        // Never wait for more than the consumer can free (it stops at our published tail).
        let want = want.max(need).min(self.tail + cap);
        let target = want - cap;
        let ok = r.producer_wait(
            self.deadline,
            |s| s.want_head.store(target.max(1), SeqCst),
            || head() >= target,
        );
        ok || head() + cap >= need
    }

    /// Publishes the current chunk, ending at `end` (16-aligned).
    fn publish(&mut self, end: u64, last: bool) {
        let r = self.ring;
        let p = &r.header().prod.0;
        let len = self.pos - self.chunk - HDR;
        let flags = if self.first { FIRST } else { 0 } | if last { LAST } else { 0 };
        r.write_chunk_header(self.chunk, len, flags, self.item);
        if !last && self.first {
            p.writing_item.store(self.item, Relaxed);
        }
        if last {
            r.commit_item(end, p.put_count.load(Relaxed) + 1);
        } else {
            p.tail.store(end, Release);
        }
        self.tail = end;
        self.first = false;
        r.wake_consumer();
    }

    /// Makes room for at least one more byte at `pos`, publishing and waiting as needed.
    fn make_room(&mut self) -> std::result::Result<(), CodecError> {
        let cap = self.ring.cap;
        let slack = cap / 8;
        loop {
            self.refresh_end();
            if self.end > self.pos {
                return Ok(());
            }
            let payload = self.pos - self.chunk - HDR;
            let bound = self.bound();
            if self.pos == bound {
                if payload < self.ring.min_split() {
                    // A small partial chunk at the end of the ring: move it to the start,
                    // behind a pad, so that it stays one piece.
                    let need = bound + HDR + payload + 1;
                    if self.space_end() >= need {
                        self.ring
                            .write_chunk_header(self.chunk, bound - self.chunk - HDR, PAD, 0);
                        self.ring
                            .move_within(self.chunk + HDR, bound + HDR, payload);
                        self.chunk = bound;
                        self.pos = bound + HDR + payload;
                        continue;
                    }
                    if !self.wait_room(need, need + slack) {
                        return Err(self.timeout());
                    }
                    continue;
                }
                self.publish(bound, false);
                self.chunk = bound;
                self.pos = bound + HDR;
                continue;
            }
            // The ring is full up to `pos`.
            if payload >= self.ring.min_split() {
                let end = align16(self.pos);
                self.publish(end, false);
                self.chunk = end;
                self.pos = end + HDR;
                continue;
            }
            if !self.wait_room(self.pos + 1, self.pos + slack) {
                return Err(self.timeout());
            }
        }
    }

    fn timeout(&mut self) -> CodecError {
        self.timed_out = true;
        serde::ser::Error::custom("timed out waiting for room in the queue")
    }

    /// Publishes the last chunk.
    fn finish(&mut self) {
        let streamed = !self.first;
        let end = align16(self.pos);
        self.publish(end, true);
        let p = &self.ring.header().prod.0;
        if streamed {
            p.writing_item.store(0, Relaxed);
        }
    }

    /// Gives the item up: unpublished bytes are simply left to be overwritten; if some
    /// chunks were published, the item is marked aborted for the consumer.
    fn abandon(&mut self) {
        if !self.first {
            let p = &self.ring.header().prod.0;
            p.abort_item.store(self.item, Release);
            p.writing_item.store(0, Relaxed);
            self.ring.wake_consumer();
        }
    }
}

impl codec::Write for Writer<'_> {
    #[inline]
    fn write(&mut self, mut bytes: &[u8]) -> std::result::Result<(), CodecError> {
        loop {
            let room = (self.end - self.pos) as usize;
            if bytes.len() <= room {
                self.ring.write_at(self.pos, bytes);
                self.pos += bytes.len() as u64;
                return Ok(());
            }
            let (now, later) = bytes.split_at(room);
            self.ring.write_at(self.pos, now);
            self.pos += room as u64;
            bytes = later;
            self.make_room()?;
        }
    }
}

/// Decodes a multi-chunk item straight out of the ring (consumer side, under the consumer
/// lock), freeing each chunk as soon as it has been read.
struct Reader<'a> {
    ring: &'a Ring,
    item: u64,
    /// Start of the current chunk (what `head` will be until it is consumed).
    head: u64,
    pos: u64,
    end: u64,
    last: bool,
    /// The item will never complete; nothing of it is delivered.
    aborted: bool,
    /// Bytes of the item read so far.
    read: u64,
}

impl Reader<'_> {
    /// Frees the current chunk and moves to the next one of this item. `false` (with
    /// `aborted` set) if the item ended without its last chunk.
    fn next_chunk(&mut self) -> Result<bool> {
        let r = self.ring;
        self.head += HDR + align16(self.end - self.head - HDR);
        r.consume(self.head, false, None);
        loop {
            if !r.wait_next_chunk(self.head, self.item)? {
                self.aborted = true;
                return Ok(false);
            }
            let (len, flags, item) = r.read_chunk_header(self.head)?;
            if flags & PAD != 0 {
                self.head += HDR + align16(len);
                r.consume(self.head, false, None);
                continue;
            }
            if flags & FIRST != 0 || item != self.item {
                // A new item began: ours was abandoned.
                self.aborted = true;
                return Ok(false);
            }
            self.pos = self.head + HDR;
            self.end = self.pos + len;
            self.last = flags & LAST != 0;
            return Ok(true);
        }
    }

    /// After decoding: reads past whatever is left of the item, up to its last chunk.
    fn skip_rest(&mut self) {
        while !self.last && !self.aborted {
            match self.next_chunk() {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => {
                    self.aborted = true;
                    return;
                }
            }
        }
    }
}

impl Reader<'_> {
    /// Copies the next `n` bytes of the item to `dst` (through `copy`), crossing chunks.
    fn read_with(
        &mut self,
        n: usize,
        mut copy: impl FnMut(&Ring, u64, usize, usize),
    ) -> std::result::Result<(), CodecError> {
        let mut done = 0;
        while done < n {
            if self.pos == self.end {
                if self.last {
                    return Err(serde::de::Error::custom(
                        "the item ended before the value did",
                    ));
                }
                match self.next_chunk() {
                    Ok(true) => continue,
                    Ok(false) => {
                        return Err(serde::de::Error::custom(
                            "the item was abandoned by its producer",
                        ))
                    }
                    Err(_) => {
                        self.aborted = true;
                        return Err(serde::de::Error::custom("corrupt chunk in the queue"));
                    }
                }
            }
            let k = (n - done).min((self.end - self.pos) as usize);
            copy(self.ring, self.pos, done, k);
            self.pos += k as u64;
            self.read += k as u64;
            done += k;
        }
        Ok(())
    }
}

/// What [`Ring::take`] makes of an item: from its bytes whole (one chunk, or a copy kept
/// for redelivery), or streamed chunk by chunk through a [`Reader`].
trait Take {
    type Out;
    fn whole(&mut self, bytes: &[u8]) -> Result<Self::Out>;
    fn streamed(&mut self, r: &mut Reader<'_>) -> Result<Self::Out>;
}

/// Decodes the item as a `T`.
struct Decode<T>(std::marker::PhantomData<T>);

impl<T: DeserializeOwned> Take for Decode<T> {
    type Out = T;
    fn whole(&mut self, bytes: &[u8]) -> Result<T> {
        decode_exact::<T>(bytes)
    }
    fn streamed(&mut self, r: &mut Reader<'_>) -> Result<T> {
        codec::decode_from_reader::<_, T>(&mut codec::Deserializer::new(r))
            .map_err(Error::serialization)
    }
}

/// Copies the item's bytes into a caller's buffer.
struct Raw<'b>(&'b mut Vec<u8>);

impl Take for Raw<'_> {
    type Out = ();
    fn whole(&mut self, bytes: &[u8]) -> Result<()> {
        self.0.clear();
        self.0.extend_from_slice(bytes);
        Ok(())
    }
    fn streamed(&mut self, r: &mut Reader<'_>) -> Result<()> {
        self.0.clear();
        loop {
            // Chunk by chunk: the buffer grows only by what has arrived.
            let n = (r.end - r.pos) as usize;
            let at = self.0.len();
            self.0.reserve(n);
            r.ring
                .read_at_uninit(r.pos, &mut self.0.spare_capacity_mut()[..n]);
            // SAFETY: the `n` bytes after `at` were just written by `read_at_uninit`.
            unsafe { self.0.set_len(at + n) };
            r.pos += n as u64;
            r.read += n as u64;
            if r.last {
                return Ok(());
            }
            match r.next_chunk() {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Error::Serialization(
                        "the item was abandoned by its producer".into(),
                    ))
                }
                Err(e) => {
                    r.aborted = true;
                    return Err(e);
                }
            }
        }
    }
}

impl<'de> codec::Read<'de> for &mut Reader<'_> {
    const COMPLETE: bool = false;

    fn read(&mut self, out: &mut [u8]) -> std::result::Result<(), CodecError> {
        self.read_with(out.len(), |ring, pos, at, k| {
            ring.read_at(pos, &mut out[at..at + k])
        })
    }

    fn read_uninit(
        &mut self,
        out: &mut [std::mem::MaybeUninit<u8>],
    ) -> std::result::Result<(), CodecError> {
        self.read_with(out.len(), |ring, pos, at, k| {
            ring.read_at_uninit(pos, &mut out[at..at + k])
        })
    }

    fn available(&self) -> usize {
        (self.end - self.pos) as usize
    }

    fn consumed(&self) -> u64 {
        self.read
    }
}
