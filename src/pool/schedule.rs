//! `Pool::schedule`: one task with options of its own (pebble's `schedule(timeout=)`).

use super::dispatcher::TaskOptions;
use super::result::finish_one;
use super::{call_span, AsyncResult, Pool};
use crate::error::Result;
use crate::spawn::target::Target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::time::Duration;

/// One task for a [`Pool`], with its own options; [`submit`](Self::submit) queues it.
/// Made by [`Pool::schedule`].
///
/// ```
/// use multiprocess::{Error, Pool};
/// use std::time::Duration;
///
/// fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
///
/// let pool = Pool::new(2)?;
/// let slow = pool.schedule(nap, 20_000).timeout(Duration::from_millis(300)).submit()?;
/// let quick = pool.schedule(nap, 1).submit()?;
/// assert!(matches!(slow.get(), Err(Error::Timeout { task: Some(0), pid: Some(_) })));
/// assert_eq!(quick.get()?, 1);
/// # Ok::<(), multiprocess::Error>(())
/// ```
#[must_use = "a scheduled task is queued only by `submit`"]
pub struct Schedule<'p, F, A, M> {
    pool: &'p Pool,
    _target: ManuallyDrop<F>,
    args: A,
    opts: TaskOptions,
    cancel_on_drop: bool,
    _marker: PhantomData<fn() -> M>,
}

impl Pool {
    /// One call of `f(args)` with options of its own: a timeout (only this task's worker
    /// is killed and replaced when it runs over), retries after a worker death, and
    /// whether dropping its [`AsyncResult`] stops it. See [`Schedule`].
    pub fn schedule<F, A, M>(&self, f: F, args: A) -> Schedule<'_, F, A, M>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
    {
        Schedule {
            pool: self,
            _target: ManuallyDrop::new(f),
            args,
            opts: TaskOptions::default(),
            cancel_on_drop: false,
            _marker: PhantomData,
        }
    }
}

impl<F, A, M> Schedule<'_, F, A, M>
where
    F: Target<A, M>,
    A: Serialize + DeserializeOwned + Send + 'static,
    F::Output: Serialize + DeserializeOwned + Send + 'static,
{
    /// The longest the task may run (over the pool's [`timeout`](super::PoolBuilder::timeout)):
    /// past it, its worker is killed (`SIGTERM`, then `SIGKILL` after the pool's grace)
    /// and replaced, and the task fails with [`Error::Timeout`](crate::Error::Timeout)
    /// naming it and the worker's pid. Other tasks are untouched.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }

    /// Runs the task again on a fresh worker when its worker dies running it, up to `n`
    /// times (over the pool's [`retries`](super::PoolBuilder::retries)).
    pub fn retries(mut self, n: u32) -> Self {
        self.opts.retries = Some(n);
        self
    }

    /// Dropping the [`AsyncResult`] before the task ends stops it: its worker is killed
    /// and replaced, as [`AsyncResult::cancel`] does. Without this, a dropped result's
    /// task is removed from the queue if it has not started, and finishes if it has.
    pub fn cancel_on_drop(mut self) -> Self {
        self.cancel_on_drop = true;
        self
    }

    /// Queues the task.
    ///
    /// # Errors
    /// The pool is closed or broken ([`Error::Process`](crate::Error::Process)).
    pub fn submit(self) -> Result<AsyncResult<F::Output>> {
        let r = self.pool.collect_async_with::<F, A, M, _, _>(
            [self.args],
            Some(1),
            finish_one,
            self.opts,
            call_span("schedule", None),
        )?;
        Ok(r.cancelling_on_drop(self.cancel_on_drop))
    }
}

impl<F, A: std::fmt::Debug, M> std::fmt::Debug for Schedule<'_, F, A, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("args", &self.args)
            .field("timeout", &self.opts.timeout)
            .field("retries", &self.opts.retries)
            .field("cancel_on_drop", &self.cancel_on_drop)
            .finish()
    }
}
