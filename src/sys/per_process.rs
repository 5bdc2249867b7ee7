//! Per-process globals that a forked child gets afresh.
//!
//! After `fork`, a child inherits every global of its parent, including mutexes that
//! other (now vanished) threads may have held. A [`PerProcess`] value is stamped with the
//! pid that created it; a process that finds another pid's stamp makes its own value and
//! leaks the inherited one without touching it, so no inherited lock is ever taken.

use std::sync::atomic::{AtomicPtr, Ordering};

pub(crate) struct PerProcess<T: 'static> {
    slot: AtomicPtr<(u32, T)>,
    init: fn() -> T,
}

impl<T: Send + Sync + 'static> PerProcess<T> {
    pub(crate) const fn new(init: fn() -> T) -> Self {
        PerProcess {
            slot: AtomicPtr::new(std::ptr::null_mut()),
            init,
        }
    }

    /// Makes `value` this process's value, without making one with the initializer first
    /// (for a new process that is told its value: a forked child's boot path, where the
    /// initializer's work and page faults would be thrown away at once).
    pub(crate) fn set(&'static self, value: T) {
        let fresh = Box::into_raw(Box::new((super::process::getpid(), value)));
        // The replaced value is leaked as `get` leaks inherited ones: another thread of
        // this process may hold a reference to it.
        self.slot.store(fresh, Ordering::Release);
    }

    /// This process's value if it has made (or been given) one; `None` otherwise, without
    /// making one.
    pub(crate) fn existing(&'static self) -> Option<&'static T> {
        let current = self.slot.load(Ordering::Acquire);
        // SAFETY: as in `get`: a non-null slot points to a leaked, published Box.
        let cur = unsafe { current.as_ref() }?;
        (cur.0 == super::process::getpid()).then_some(&cur.1)
    }

    /// This process's value.
    pub(crate) fn get(&'static self) -> &'static T {
        let pid = super::process::getpid();
        let current = self.slot.load(Ordering::Acquire);
        // SAFETY: a non-null slot always points to a leaked Box that is never freed once
        // published, so it lives for 'static.
        if let Some(cur) = unsafe { current.as_ref() } {
            if cur.0 == pid {
                return &cur.1;
            }
        }
        let fresh = Box::into_raw(Box::new((pid, (self.init)())));
        match self
            .slot
            .compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire)
        {
            // SAFETY: we just published `fresh`, a leaked Box.
            Ok(_) => unsafe { &(*fresh).1 },
            Err(winner) => {
                // SAFETY: `fresh` was never published, so we still own it exclusively.
                drop(unsafe { Box::from_raw(fresh) });
                // SAFETY: the winner is a published, leaked Box (see above). It was made
                // by a thread of this process (only this process's threads race here).
                unsafe { &(*winner).1 }
            }
        }
    }
}
