//! Non-blocking sends that own their buffers — this module's only `unsafe`.
//!
//! An agent must never sit in a blocking `MPI_Send`: rank 0 may at the same moment be
//! sending it a large chunk, and two blocking sends of large messages wait for each other
//! for ever. So an agent starts each send with `MPI_Isend` and keeps going; rsmpi asks
//! for a `'static` buffer for a request that outlives its scope, so the buffer is leaked
//! while the send runs and taken back once MPI says the send is complete.
#![allow(unsafe_code)]

use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

struct Pending {
    request: Request<'static, [u8], StaticScope>,
    /// The leaked buffer the request reads from.
    buffer: *mut [u8],
}

/// Sends in flight.
pub(crate) struct Sends {
    pending: Vec<Pending>,
}

impl Sends {
    pub(crate) fn new() -> Self {
        Sends {
            pending: Vec::new(),
        }
    }

    /// Starts sending `bytes` to `rank` with `tag`; returns at once.
    pub(crate) fn send(&mut self, world: &SimpleCommunicator, rank: i32, tag: i32, bytes: Vec<u8>) {
        let buffer: &'static mut [u8] = Box::leak(bytes.into_boxed_slice());
        let raw: *mut [u8] = buffer;
        let shared: &'static [u8] = buffer;
        let request = world
            .process_at_rank(rank)
            .immediate_send_with_tag(StaticScope, shared, tag);
        self.pending.push(Pending {
            request,
            buffer: raw,
        });
    }

    /// Lets MPI progress; frees the buffers of finished sends. Returns how many are left.
    pub(crate) fn progress(&mut self) -> usize {
        let mut left = Vec::with_capacity(self.pending.len());
        for p in self.pending.drain(..) {
            match p.request.test() {
                Ok(_) => {
                    // SAFETY: `buffer` came from `Box::leak` in `send` and nothing else
                    // refers to it: the request that read it is complete (MPI_Test said
                    // so and rsmpi consumed it), and the shared reference given to it
                    // died with it.
                    drop(unsafe { Box::from_raw(p.buffer) });
                }
                Err(request) => left.push(Pending {
                    request,
                    buffer: p.buffer,
                }),
            }
        }
        self.pending = left;
        self.pending.len()
    }

    /// Gives up on the sends still in flight (at shutdown, when the peer has stopped
    /// receiving): their buffers stay leaked, since MPI may still read them.
    pub(crate) fn abandon(&mut self) {
        for p in self.pending.drain(..) {
            std::mem::forget(p.request);
        }
    }
}
