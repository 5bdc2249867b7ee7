//! The job table that every pool backend dispatches from: jobs submitted by the pool's
//! handle, their input pulled chunk by chunk, each item settled once (delivered or
//! failed), and each job finished or cancelled. The local dispatcher and the MPI one
//! differ only in where chunks go and how results come back.

use super::dispatcher::{Command, Job, Shared};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;

struct JobState {
    job: Job,
    /// Items pulled from the input so far.
    pulled: u64,
    /// Items delivered or failed so far.
    accounted: u64,
    exhausted: bool,
    bar: Option<indicatif::ProgressBar>,
}

/// A chunk freshly pulled from a job's input.
pub(crate) struct NewChunk {
    pub job: u64,
    /// Its items are `start..start + count` of the job.
    pub start: u64,
    pub count: u64,
    /// The entry that runs the job's items.
    pub entry: i64,
    /// The items, encoded (see `task::ChunkBuilder`).
    pub frame: Vec<u8>,
    /// The job's own timeout and retries, over the pool's.
    pub opts: super::dispatcher::TaskOptions,
}

/// What the commands taken by [`JobTable::take_commands`] ask of the dispatcher, beyond
/// the job table.
#[derive(Debug, Default)]
pub(crate) struct Asked {
    /// Jobs cancelled (already aborted here): their work in flight should be stopped.
    pub cancelled: Vec<u64>,
    /// The pool was closed: finish the jobs, then stop.
    pub close: bool,
    /// The pool was terminated: stop now.
    pub terminate: bool,
    /// Jobs whose result was dropped: their input is no longer pulled; their chunks not
    /// yet sent should be dropped (see [`JobTable::fail_unsent`]).
    pub forgotten: Vec<u64>,
}

/// The jobs of one pool, by id (submission order).
pub(crate) struct JobTable {
    jobs: BTreeMap<u64, JobState>,
    /// The jobs whose input may have more (not exhausted): the only ones
    /// [`Self::next_chunk`] looks at, so that many jobs waiting for their results (a burst
    /// of `apply_async`) cost nothing per chunk.
    pulling: BTreeSet<u64>,
    /// The jobs given results or failures since the last [`Self::flush`].
    touched: Vec<u64>,
    progress: bool,
}

impl JobTable {
    /// An empty table; with `progress`, each job draws a progress bar.
    pub(crate) fn new(progress: bool) -> Self {
        JobTable {
            jobs: BTreeMap::new(),
            pulling: BTreeSet::new(),
            touched: Vec::new(),
            progress,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.jobs.contains_key(&id)
    }

    /// Adds a job; if the pool is `broken`, fails it at once instead.
    pub(crate) fn submit(&mut self, mut job: Job, broken: Option<&str>) {
        if let Some(why) = broken {
            job.sink.abort(Error::process(why.to_string()));
            return;
        }
        let bar = self.progress.then(|| progress_bar(job.len));
        self.pulling.insert(job.id);
        self.jobs.insert(
            job.id,
            JobState {
                job,
                pulled: 0,
                accounted: 0,
                exhausted: false,
                bar,
            },
        );
    }

    /// Applies the commands the pool's handle sent: submissions and cancellations here,
    /// the rest returned.
    pub(crate) fn take_commands(&mut self, shared: &Shared, broken: Option<&str>) -> Asked {
        let mut asked = Asked::default();
        for c in shared.take_commands() {
            match c {
                Command::Submit(job) => self.submit(job, broken),
                Command::Cancel(id) => {
                    if self.cancel(id) {
                        asked.cancelled.push(id);
                    }
                }
                Command::Forget(id) => {
                    if self.stop_pulling(id) {
                        asked.forgotten.push(id);
                    }
                }
                Command::Close => asked.close = true,
                Command::Terminate => asked.terminate = true,
            }
        }
        asked
    }

    /// The next chunk of input, from the oldest job that has some ready; `spare` gives
    /// memory to build it in. Items that cannot be encoded fail in place. Jobs whose
    /// input ends here finish once their items are settled.
    pub(crate) fn next_chunk(&mut self, mut spare: impl FnMut() -> Vec<u8>) -> Option<NewChunk> {
        let mut from = 0;
        while let Some(&id) = self.pulling.range(from..).next() {
            from = id + 1;
            let Some(js) = self.jobs.get_mut(&id) else {
                self.pulling.remove(&id);
                continue;
            };
            if js.exhausted {
                self.pulling.remove(&id);
                continue;
            }
            match pull(js, spare()) {
                Pulled::Later => {}
                Pulled::Exhausted => {
                    js.exhausted = true;
                    self.pulling.remove(&id);
                    self.settle(id);
                }
                Pulled::Chunk {
                    start,
                    count,
                    frame,
                } => {
                    return Some(NewChunk {
                        job: id,
                        start,
                        count,
                        entry: js.job.entry,
                        frame,
                        opts: js.job.opts,
                    })
                }
            }
        }
        None
    }

    /// Hands results of job `id`, from item `start` on, to its sink; how many items they
    /// were. `None` if the job is gone (cancelled). Not yet counted: see [`Self::account`].
    pub(crate) fn deliver(&mut self, id: u64, start: u64, results: &[u8]) -> Option<Result<u64>> {
        let js = self.jobs.get_mut(&id)?;
        self.touched.push(id);
        // A lazy job's results are decoded here, on the dispatcher's thread, by the
        // caller's `Deserialize`: a panic there fails the chunk, not the pool.
        let sink = &mut js.job.sink;
        Some(
            panic::catch_unwind(AssertUnwindSafe(|| sink.deliver(start, results))).unwrap_or_else(
                |payload| {
                    let (message, _) = crate::spawn::target::panic_details(payload);
                    Err(Error::Serialization(format!(
                        "decoding a result panicked: {message}"
                    )))
                },
            ),
        )
    }

    /// Hands what the jobs' sinks kept back to their consumers (see [`Sink::flush`]):
    /// call once per round of the dispatcher's loop, before it waits.
    ///
    /// [`Sink::flush`]: super::result::Sink::flush
    pub(crate) fn flush(&mut self) {
        let mut last = None;
        for id in self.touched.drain(..) {
            if last == Some(id) {
                continue;
            }
            last = Some(id);
            if let Some(js) = self.jobs.get_mut(&id) {
                js.job.sink.flush();
            }
        }
    }

    /// Counts `n` items of job `id` as settled (after [`Self::deliver`]).
    pub(crate) fn account(&mut self, id: u64, n: u64) {
        if let Some(js) = self.jobs.get_mut(&id) {
            js.accounted += n;
        }
    }

    /// Item `index` of job `id` failed; false if the job is gone.
    pub(crate) fn fail(&mut self, id: u64, index: u64, e: Error) -> bool {
        match self.jobs.get_mut(&id) {
            Some(js) => {
                js.job.sink.fail(index, e);
                js.accounted += 1;
                self.touched.push(id);
                true
            }
            None => false,
        }
    }

    /// Called after every change to a job's accounting: moves its progress bar, and
    /// finishes the job once its input is exhausted and every item pulled is settled.
    pub(crate) fn settle(&mut self, id: u64) {
        let done = match self.jobs.get(&id) {
            Some(js) => {
                if let Some(bar) = &js.bar {
                    bar.set_position(js.accounted);
                }
                js.exhausted && js.accounted >= js.pulled
            }
            None => false,
        };
        if done {
            if let Some(mut js) = self.jobs.remove(&id) {
                if let Some(bar) = &js.bar {
                    bar.finish();
                }
                js.job.sink.finish();
            }
        }
    }

    /// Stops pulling the input of job `id` (its result was dropped before it finished):
    /// the items not pulled yet never run, and the job finishes once the items already
    /// pulled are settled. False if there was no such job.
    pub(crate) fn stop_pulling(&mut self, id: u64) -> bool {
        match self.jobs.get_mut(&id) {
            Some(js) => {
                js.exhausted = true;
                self.pulling.remove(&id);
                self.settle(id);
                true
            }
            None => false,
        }
    }

    /// Fails items `start..start + count` of job `id` as cancelled (chunks of a dropped
    /// job that were never sent), and settles the job.
    pub(crate) fn fail_unsent(&mut self, id: u64, start: u64, count: u64) {
        for k in 0..count {
            self.fail(id, start + k, Error::Cancelled);
        }
        self.settle(id);
    }

    /// The chunk size job `id` asked for, if the job is still here.
    pub(crate) fn chunksize(&self, id: u64) -> Option<usize> {
        self.jobs.get(&id).map(|js| js.job.chunksize)
    }

    /// The tracing span of job `id` (its `map`/`imap` call), if the job is still here.
    pub(crate) fn span(&self, id: u64) -> Option<tracing::Span> {
        self.jobs.get(&id).map(|js| js.job.span.clone())
    }

    /// Cancels job `id`: everything it has not settled fails with [`Error::Cancelled`].
    /// False if there was no such job.
    pub(crate) fn cancel(&mut self, id: u64) -> bool {
        self.pulling.remove(&id);
        match self.jobs.remove(&id) {
            Some(mut js) => {
                js.job.sink.abort(Error::Cancelled);
                true
            }
            None => false,
        }
    }

    /// Ends every job early: what each has not settled fails with `error()`.
    pub(crate) fn abort_all(&mut self, mut error: impl FnMut() -> Error) {
        self.pulling.clear();
        for (_, mut js) in std::mem::take(&mut self.jobs) {
            js.job.sink.abort(error());
        }
    }
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
fn progress_bar(len: Option<u64>) -> indicatif::ProgressBar {
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    let style = match len {
        Some(_) => indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} tasks [{elapsed_precise} < {eta_precise}, {per_sec}]",
        ),
        None => indicatif::ProgressStyle::with_template(
            "{spinner} {pos} tasks [{elapsed_precise}, {per_sec}]",
        ),
    };
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar
}

/// What [`pull`] got from a job's input.
enum Pulled {
    /// Items `start..start + count`, encoded in `frame`.
    Chunk {
        start: u64,
        count: u64,
        frame: Vec<u8>,
    },
    /// The input is exhausted.
    Exhausted,
    /// Nothing now: the job's window (lazy `imap`) is full until results are consumed,
    /// or its input is still being encoded by the caller.
    Later,
}

/// Pulls the next chunk of a job's input. Items that cannot be encoded fail in place
/// (and are settled) and pulling goes on.
fn pull(js: &mut JobState, mut spare: Vec<u8>) -> Pulled {
    let job = &mut js.job;
    loop {
        if let Some((max, consumed)) = &job.window {
            if js.pulled.saturating_sub(consumed.load(Ordering::SeqCst)) >= *max {
                return Pulled::Later;
            }
        }
        let start = js.pulled;
        // A lazy input runs the caller's code here, on the dispatcher's thread: its
        // iterator and its items' `Serialize`. A panic there ends that job's input (the
        // item it was pulling fails with it), not the pool.
        let chunksize = job.chunksize;
        let source = &mut job.source;
        let spare = std::mem::take(&mut spare);
        let next =
            match panic::catch_unwind(AssertUnwindSafe(|| source.next_chunk(chunksize, spare))) {
                Ok(next) => next,
                Err(payload) => {
                    let (message, location) = crate::spawn::target::panic_details(payload);
                    job.sink.fail(
                        start,
                        Error::Panicked {
                            message: format!("pulling the input panicked: {message}"),
                            location,
                        },
                    );
                    js.pulled += 1;
                    js.accounted += 1;
                    return Pulled::Exhausted;
                }
            };
        match next {
            None if job.source.more_later() => return Pulled::Later,
            None => return Pulled::Exhausted,
            Some((count, Ok(frame))) => {
                js.pulled += count;
                return Pulled::Chunk {
                    start,
                    count,
                    frame,
                };
            }
            Some((count, Err(e))) => {
                js.pulled += count;
                for k in 0..count {
                    job.sink
                        .fail(start + k, Error::Serialization(e.to_string()));
                }
                js.accounted += count;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::dispatcher::{IterSource, Source};
    use super::super::result::Sink;
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::{Arc, Mutex};

    /// What a job's sink was told, in order.
    #[derive(Debug, Default, PartialEq)]
    struct Log {
        delivered: Vec<(u64, usize)>,
        failed: Vec<(u64, String)>,
        finished: bool,
        aborted: Option<String>,
    }

    struct LogSink(Arc<Mutex<Log>>);

    impl Sink for LogSink {
        fn deliver(&mut self, start: u64, results: &[u8]) -> Result<u64> {
            if results.is_empty() {
                return Err(Error::Serialization("empty".into()));
            }
            self.0
                .lock()
                .unwrap()
                .delivered
                .push((start, results.len()));
            Ok(results.len() as u64)
        }
        fn fail(&mut self, index: u64, error: Error) {
            self.0
                .lock()
                .unwrap()
                .failed
                .push((index, error.to_string()));
        }
        fn finish(&mut self) {
            self.0.lock().unwrap().finished = true;
        }
        fn abort(&mut self, error: Error) {
            self.0.lock().unwrap().aborted = Some(error.to_string());
        }
    }

    /// A source whose items at the given positions cannot be encoded.
    struct Unencodable {
        left: u64,
        bad: Vec<u64>,
        at: u64,
    }

    impl Source for Unencodable {
        fn next_chunk(&mut self, max: usize, _: Vec<u8>) -> Option<(u64, Result<Vec<u8>>)> {
            if self.left == 0 {
                return None;
            }
            let n = (max as u64).min(self.left);
            self.left -= n;
            let range = self.at..self.at + n;
            self.at += n;
            if self.bad.iter().any(|b| range.contains(b)) {
                Some((n, Err(Error::Serialization("unencodable".into()))))
            } else {
                Some((n, Ok(vec![0; n as usize])))
            }
        }
    }

    fn job(id: u64, chunksize: usize, source: Box<dyn Source>) -> (Job, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let job = Job {
            id,
            entry: 7,
            chunksize,
            source,
            sink: Box::new(LogSink(log.clone())),
            window: None,
            len: None,
            opts: Default::default(),
            span: tracing::Span::none(),
        };
        (job, log)
    }

    fn items(n: u64) -> Box<dyn Source> {
        Box::new(IterSource::new(0..n))
    }

    #[test]
    fn chunks_come_in_order_and_a_job_finishes_when_all_settle() {
        let mut t = JobTable::new(false);
        let (j, log) = job(1, 2, items(5));
        t.submit(j, None);
        let mut chunks = Vec::new();
        while let Some(c) = t.next_chunk(Vec::new) {
            assert_eq!((c.job, c.entry), (1, 7));
            chunks.push((c.start, c.count));
        }
        assert_eq!(chunks, vec![(0, 2), (2, 2), (4, 1)]);
        // Exhausted, but nothing settled: not finished.
        assert!(t.contains(1) && !log.lock().unwrap().finished);
        for (start, count) in chunks {
            let n = t
                .deliver(1, start, &vec![0; count as usize])
                .unwrap()
                .unwrap();
            t.account(1, n);
            t.settle(1);
        }
        assert!(!t.contains(1) && t.is_empty());
        let log = log.lock().unwrap();
        assert!(log.finished && log.failed.is_empty() && log.aborted.is_none());
        assert_eq!(log.delivered, vec![(0, 2), (2, 2), (4, 1)]);
    }

    #[test]
    fn a_failed_item_settles_it() {
        let mut t = JobTable::new(false);
        let (j, log) = job(3, 2, items(2));
        t.submit(j, None);
        let c = t.next_chunk(Vec::new).unwrap();
        assert!(t.next_chunk(Vec::new).is_none());
        assert!(t.fail(3, c.start, Error::timeout()));
        t.settle(3);
        assert!(t.contains(3));
        assert!(t.fail(3, c.start + 1, Error::timeout()));
        t.settle(3);
        assert!(!t.contains(3));
        assert_eq!(log.lock().unwrap().failed.len(), 2);
        assert!(log.lock().unwrap().finished);
        // A job that is gone takes nothing.
        assert!(!t.fail(3, 0, Error::timeout()));
        assert!(t.deliver(3, 0, b"x").is_none());
    }

    #[test]
    fn unencodable_items_fail_in_place_and_pulling_goes_on() {
        let mut t = JobTable::new(false);
        let src = Unencodable {
            left: 6,
            bad: vec![2],
            at: 0,
        };
        let (j, log) = job(4, 2, Box::new(src));
        t.submit(j, None);
        let mut starts = Vec::new();
        while let Some(c) = t.next_chunk(Vec::new) {
            starts.push(c.start);
            t.account(4, c.count);
            t.settle(4);
        }
        assert_eq!(starts, vec![0, 4]);
        let log = log.lock().unwrap();
        assert_eq!(
            log.failed.iter().map(|f| f.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(log.finished);
    }

    #[test]
    fn a_full_window_holds_the_input_back() {
        let mut t = JobTable::new(false);
        let consumed = Arc::new(AtomicU64::new(0));
        let (mut j, _log) = job(5, 1, items(10));
        j.window = Some((2, consumed.clone()));
        t.submit(j, None);
        assert!(t.next_chunk(Vec::new).is_some());
        assert!(t.next_chunk(Vec::new).is_some());
        assert!(t.next_chunk(Vec::new).is_none());
        consumed.store(1, Ordering::SeqCst);
        assert_eq!(t.next_chunk(Vec::new).map(|c| c.start), Some(2));
    }

    #[test]
    fn cancel_aborts_and_a_broken_pool_refuses() {
        let mut t = JobTable::new(false);
        let (j, log) = job(6, 1, items(3));
        t.submit(j, None);
        assert!(t.next_chunk(Vec::new).is_some());
        assert!(t.cancel(6));
        assert!(!t.cancel(6));
        assert!(t.is_empty() && t.next_chunk(Vec::new).is_none());
        assert_eq!(
            log.lock().unwrap().aborted.as_deref(),
            Some(Error::Cancelled.to_string().as_str())
        );

        let (j, log) = job(7, 1, items(3));
        t.submit(j, Some("the pool is broken"));
        assert!(t.is_empty());
        assert!(log
            .lock()
            .unwrap()
            .aborted
            .as_deref()
            .unwrap()
            .contains("broken"));

        let (a, la) = job(8, 1, items(3));
        let (b, lb) = job(9, 1, items(3));
        t.submit(a, None);
        t.submit(b, None);
        t.abort_all(Error::timeout);
        assert!(t.is_empty());
        assert!(la.lock().unwrap().aborted.is_some() && lb.lock().unwrap().aborted.is_some());
    }

    #[test]
    fn commands_apply_to_the_table() {
        let shared = Shared::new().unwrap();
        let mut t = JobTable::new(false);
        let (j, log) = job(10, 1, items(1));
        shared.send(Command::Submit(j));
        shared.send(Command::Cancel(10));
        shared.send(Command::Cancel(11));
        shared.send(Command::Close);
        let asked = t.take_commands(&shared, None);
        assert_eq!(asked.cancelled, vec![10]);
        assert!(asked.close && !asked.terminate);
        assert!(t.is_empty() && log.lock().unwrap().aborted.is_some());
        shared.send(Command::Terminate);
        assert!(t.take_commands(&shared, None).terminate);
    }
}
