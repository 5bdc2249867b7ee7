//! The supervisor: one long-lived thread per process that starts children and reaps the
//! ones nobody waits for.
//!
//! Why a thread: Linux sends the parent-death signal when the child's parent *thread*
//! exits, not the process. Children started from a short-lived thread (every test under
//! `cargo test` runs on one) would be killed when it ends. Starting every child here ties
//! their lives to the process. Forkserver children inherit the same parent thread.

use crate::sys::fd::{eventfd, eventfd_drain, eventfd_signal, poll_readable};
use crate::sys::per_process::PerProcess;
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Mutex;

type Job = Box<dyn FnOnce() + Send>;
type OnExit = Box<dyn FnOnce() + Send>;

pub(crate) struct Supervisor {
    jobs: Mutex<VecDeque<Job>>,
    watches: Mutex<Vec<(OwnedFd, OnExit)>>,
    wake: OwnedFd,
}

static SUPERVISOR: PerProcess<Supervisor> = PerProcess::new(Supervisor::start);

/// This process's supervisor (started on first use).
pub(crate) fn get() -> &'static Supervisor {
    SUPERVISOR.get()
}

impl Supervisor {
    fn start() -> Supervisor {
        let wake = eventfd().expect("multiprocess: cannot create the supervisor's eventfd");
        let sup = Supervisor {
            jobs: Mutex::new(VecDeque::new()),
            watches: Mutex::new(Vec::new()),
            wake,
        };
        std::thread::Builder::new()
            .name("multiprocess-supervisor".into())
            // Forked children run their target on this thread: give it a main-sized stack.
            .stack_size(8 << 20)
            .spawn(|| get().run())
            .expect("multiprocess: cannot start the supervisor thread");
        sup
    }

    /// Runs `f` on the supervisor thread and returns its result.
    pub(crate) fn call<T: Send + 'static>(
        &'static self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(Box::new(move || {
                let _ = tx.send(f());
            }));
        eventfd_signal(self.wake.as_fd());
        rx.recv()
            .expect("multiprocess: the supervisor thread is gone")
    }

    /// Calls `on_exit` (on the supervisor thread) once the child behind `pidfd` has
    /// exited; `on_exit` reaps it.
    pub(crate) fn watch(&'static self, pidfd: OwnedFd, on_exit: impl FnOnce() + Send + 'static) {
        self.watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((pidfd, Box::new(on_exit)));
        eventfd_signal(self.wake.as_fd());
    }

    fn run(&'static self) {
        loop {
            let fds: Vec<OwnedFd> = {
                let w = self.watches.lock().unwrap_or_else(|p| p.into_inner());
                w.iter().filter_map(|(fd, _)| fd.try_clone().ok()).collect()
            };
            let mut borrowed = vec![self.wake.as_fd()];
            borrowed.extend(fds.iter().map(|f| f.as_fd()));
            let ready = match poll_readable(&borrowed, None) {
                Ok(r) => r,
                Err(_) => continue,
            };
            if ready[0].readable {
                eventfd_drain(self.wake.as_fd());
                loop {
                    let job = self
                        .jobs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop_front();
                    match job {
                        Some(job) => job(),
                        None => break,
                    }
                }
            }
            if ready[1..].iter().any(|r| r.readable) {
                let done: Vec<(OwnedFd, OnExit)> = {
                    let mut w = self.watches.lock().unwrap_or_else(|p| p.into_inner());
                    let mut done = Vec::new();
                    let mut i = 0;
                    while i < w.len() {
                        let exited =
                            poll_readable(&[w[i].0.as_fd()], Some(std::time::Duration::ZERO))
                                .map(|r| r[0].readable)
                                .unwrap_or(true);
                        if exited {
                            done.push(w.swap_remove(i));
                        } else {
                            i += 1;
                        }
                    }
                    done
                };
                for (_pidfd, on_exit) in done {
                    on_exit();
                }
            }
        }
    }
}
