//! The children registry: every child this process started and has not reaped yet, so
//! that `active_children` can list them and, when this process ends (its `main` returns,
//! or a child's target returns), daemonic children are terminated and the others waited
//! for, as Python does.
//!
//! It lives beside the process identity (`super`) because the end of a child's life
//! ([`super::child_main`]) needs it; `Process` registers its children here as
//! [`Child`] values.

use crate::sys::per_process::PerProcess;
use crate::sys::process as sysproc;
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A registered child, as the registry sees it.
pub(crate) trait Child: Send + Sync + 'static {
    /// Whether it is terminated (rather than waited for) at exit.
    fn is_daemon(&self) -> bool;
    /// Sends it `SIGTERM` if it still runs.
    fn terminate(&self);
    /// Waits until it ends and reaps it.
    fn wait(&self);
    /// Reaps it if it has ended; true if it has (or never started).
    fn try_reap(&self) -> bool;
    /// The value itself, to get the concrete type back.
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

type Registry = Mutex<Vec<Arc<dyn Child>>>;

/// Started children that have not been reaped yet.
static CHILDREN: PerProcess<Registry> = PerProcess::new(|| Mutex::new(Vec::new()));

fn lock() -> MutexGuard<'static, Vec<Arc<dyn Child>>> {
    CHILDREN.get().lock().unwrap_or_else(|p| p.into_inner())
}

fn same(a: &Arc<dyn Child>, b: *const ()) -> bool {
    std::ptr::eq(Arc::as_ptr(a).cast::<()>(), b)
}

/// Set when the first child is registered (and the exit hook with it); inherited by
/// forked children, so false only where no child was ever registered.
static AT_EXIT: AtomicBool = AtomicBool::new(false);

/// Adds a started child.
pub(crate) fn register(child: Arc<dyn Child>) {
    // Not a `Once`: a fork in the middle of its initialisation would leave the child
    // waiting on it for ever. A forked child inherits the registration itself.
    if !AT_EXIT.swap(true, Ordering::SeqCst) {
        sysproc::at_exit(at_exit_hook);
    }
    lock().push(child);
}

/// Removes the child whose value is at `child` (a pointer from `Arc::as_ptr`).
pub(crate) fn unregister<T: ?Sized>(child: *const T) {
    let child = child.cast::<()>();
    lock().retain(|c| !same(c, child));
}

/// Reaps every registered child that has ended (Python does this on each `start`).
pub(crate) fn reap_finished() {
    let snapshot = lock().clone();
    for c in snapshot {
        if c.try_reap() {
            unregister(Arc::as_ptr(&c));
        }
    }
}

/// The registered children.
pub(crate) fn snapshot() -> Vec<Arc<dyn Child>> {
    lock().clone()
}

extern "C" fn at_exit_hook() {
    let _ = std::panic::catch_unwind(exit_children);
}

/// Terminates daemonic children and waits for the others (run at exit, and by a child
/// when its target returns). Returns false at once, touching nothing, in a process that
/// never registered a child (most children: their exit path stays short), including a
/// child forked from a process that did.
pub(crate) fn exit_children() -> bool {
    if !AT_EXIT.load(Ordering::SeqCst) {
        return false;
    }
    let Some(registry) = CHILDREN.existing() else {
        return false;
    };
    let children = registry.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for c in children.iter().filter(|c| c.is_daemon()) {
        c.terminate();
    }
    for c in &children {
        c.wait();
        unregister(Arc::as_ptr(c));
    }
    true
}
