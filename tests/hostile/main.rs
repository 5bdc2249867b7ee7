//! Attacks on every boundary: each sends what an attacker would, over real sockets to
//! real servers and real processes, and checks that a normal peer is served afterwards.

#[path = "../common/mod.rs"]
mod common;

mod codec;
mod listener;
mod managers;
mod pool;
mod segments;
