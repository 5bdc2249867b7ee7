//! Attacks on every boundary: crafted bytes from real sockets, pipes and shared memory,
//! sent by real processes. After each, the victim serves a normal peer.

#[path = "../common/mod.rs"]
mod common;

mod codec;
