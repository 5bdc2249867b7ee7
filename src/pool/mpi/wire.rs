//! What rank 0 and the agents say to each other.
//!
//! * Tags: [`TAG_HELLO`] (agent → rank 0, once), [`TAG_CONTROL`] (rank 0 → agent: open
//!   or close a pool, cancel a chunk, refuse, shut down), and `TAG_POOL + slot` for a
//!   pool's chunks (rank 0 → agent) and results (agent → rank 0).
//! * A chunk travels exactly as the local pool sends it to a worker: the
//!   `[tag][seq][entry]` prefix and the chunk frame (`pool::task`). The agent hands it
//!   to its local pool unchanged.
//! * Results come back as `[kind u8][seq u64][index u64]` then a body: for
//!   [`RESULTS`], the encoded results exactly as the local worker produced them; for
//!   [`FAIL`] and [`ABORT`], a [`WireError`].

use crate::error::{Error, ExitStatus, Result};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub(crate) const TAG_HELLO: i32 = 1;
pub(crate) const TAG_CONTROL: i32 = 2;
pub(crate) const TAG_POOL: i32 = 16;
/// Pools are told apart by `TAG_POOL + id % POOL_SLOTS` (MPI guarantees tags up to 32767).
pub(crate) const POOL_SLOTS: u64 = 32_000;

pub(crate) fn pool_tag(pool: u64) -> i32 {
    TAG_POOL + (pool % POOL_SLOTS) as i32
}

/// An agent introduces itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub build_id: Vec<u8>,
    pub host: String,
    pub pid: u32,
    pub cpus: u32,
    /// `MULTIPROCESS_MPI_WORKERS` on that rank, if set.
    pub workers: Option<u32>,
}

/// What a pool's workers need to know, as [`crate::pool::Config`] has it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PoolSpec {
    pub workers: u32,
    pub max_tasks: Option<u64>,
    pub init: Option<(i64, Vec<u8>)>,
    pub method: String,
    pub timeout: Option<Duration>,
    pub grace: Duration,
    pub retries: u32,
    pub memory_limit: Option<u64>,
}

/// Rank 0 → agent, on [`TAG_CONTROL`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Control {
    Open { pool: u64, spec: PoolSpec },
    Cancel { pool: u64, seq: u64 },
    Close { pool: u64 },
    Refuse { why: String },
    Shutdown,
}

// Agent → rank 0 kinds, on the pool's tag.
pub(crate) const RESULTS: u8 = 1;
pub(crate) const FAIL: u8 = 2;
pub(crate) const ABORT: u8 = 3;
pub(crate) const OPENED: u8 = 4;
pub(crate) const CLOSED: u8 = 5;
pub(crate) const HEADER: usize = 17;

pub(crate) fn header(kind: u8, seq: u64, index: u64, body_len: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + body_len);
    m.push(kind);
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(&index.to_le_bytes());
    m
}

pub(crate) fn parse_header(msg: &[u8]) -> Result<(u8, u64, u64, &[u8])> {
    if msg.len() < HEADER {
        return Err(Error::protocol("short message from an MPI agent"));
    }
    let seq = u64::from_le_bytes(msg[1..9].try_into().expect("8 bytes"));
    let index = u64::from_le_bytes(msg[9..17].try_into().expect("8 bytes"));
    Ok((msg[0], seq, index, &msg[HEADER..]))
}

/// An [`Error`] as it crosses the network (only the kinds a pool task can end with;
/// anything else travels as its message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum WireError {
    Panicked {
        message: String,
        location: String,
    },
    WorkerDied {
        pid: u32,
        status: ExitStatus,
        task: Option<u64>,
    },
    Timeout {
        pid: Option<u32>,
        task: Option<u64>,
    },
    MemoryLimit {
        task: Option<u64>,
        limit: u64,
        used: u64,
    },
    Serialization(String),
    Protocol(String),
    Cancelled,
    Process(String),
}

impl WireError {
    pub(crate) fn from_error(e: &Error) -> WireError {
        match e {
            Error::Panicked { message, location } => WireError::Panicked {
                message: message.clone(),
                location: location.clone(),
            },
            Error::WorkerDied { pid, status, task } => WireError::WorkerDied {
                pid: *pid,
                status: *status,
                task: *task,
            },
            Error::Timeout { pid, task } => WireError::Timeout {
                pid: *pid,
                task: *task,
            },
            Error::MemoryLimit { task, limit, used } => WireError::MemoryLimit {
                task: *task,
                limit: *limit,
                used: *used,
            },
            Error::Serialization(s) => WireError::Serialization(s.clone()),
            Error::Protocol(s) => WireError::Protocol(s.clone()),
            Error::Cancelled => WireError::Cancelled,
            Error::Process(s) => WireError::Process(s.clone()),
            other => WireError::Process(other.to_string()),
        }
    }

    /// The error, with task numbers moved from the chunk's to the call's (`+ base`).
    pub(crate) fn into_error(self, base: u64) -> Error {
        match self {
            WireError::Panicked { message, location } => Error::Panicked { message, location },
            WireError::WorkerDied { pid, status, task } => Error::WorkerDied {
                pid,
                status,
                task: task.map(|t| t + base),
            },
            WireError::Timeout { pid, task } => Error::Timeout {
                pid,
                task: task.map(|t| t + base),
            },
            WireError::MemoryLimit { task, limit, used } => Error::MemoryLimit {
                task: task.map(|t| t + base),
                limit,
                used,
            },
            WireError::Serialization(s) => Error::Serialization(s),
            WireError::Protocol(s) => Error::Protocol(s),
            WireError::Cancelled => Error::Cancelled,
            WireError::Process(s) => Error::Process(s),
        }
    }
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    crate::reduction::encode_append(v, Vec::new())
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    crate::reduction::decode_exact(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_with_task_numbers_moved() {
        let e = Error::WorkerDied {
            pid: 4,
            status: ExitStatus::Signaled(6),
            task: Some(2),
        };
        let w: WireError = decode(&encode(&WireError::from_error(&e)).unwrap()).unwrap();
        match w.into_error(10) {
            Error::WorkerDied { pid, status, task } => {
                assert_eq!((pid, status, task), (4, ExitStatus::Signaled(6), Some(12)))
            }
            other => panic!("{other:?}"),
        }
        let h = header(FAIL, 7, 3, 0);
        let (k, s, i, body) = parse_header(&h).unwrap();
        assert_eq!((k, s, i, body.len()), (FAIL, 7, 3, 0));
        assert!(parse_header(&h[..5]).is_err());
    }
}
