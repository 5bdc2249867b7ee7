//! Attacks on every boundary, with real sockets and real processes.

#[path = "../common/mod.rs"]
mod common;

mod listener;
