//! Targets are code, not data: a target is a fn item or a non-capturing closure (a
//! zero-sized type), identified in the child by the address of a monomorphized entry
//! function, sent as an offset from an anchor in this crate.
#![allow(unsafe_code)]

use crate::connection::Connection;
use crate::error::Result;
use crate::reduction;
use crate::sys::image;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::fmt::Debug;
use std::os::fd::AsFd;
use std::panic::{self, AssertUnwindSafe};

mod sealed {
    pub trait Sealed<Args, Marker> {}
}

/// Something that can run in another process: a fn item or a closure that captures
/// nothing, taking its arguments as one value (`()` for none, a tuple for several).
///
/// It is implemented for every `Fn` of up to eight parameters; the `Marker` parameter
/// only tells the arities apart and is always inferred.
///
/// A target must not capture state, because it runs in another address space: pass state
/// in the arguments instead. Capturing closures are rejected at compile time:
///
/// ```compile_fail
/// let n = 5;
/// let p = multiprocess::Process::new(move |()| println!("{n}"), ()); // captures `n`
/// ```
///
/// The check is a constant evaluated for each target type, so `cargo build` (and
/// `cargo test`) report it, pointing at the call, but `cargo check` does not: rustc
/// evaluates constants that depend on a generic parameter only when it generates code,
/// which `check` skips, and stable Rust has no trait bound for "zero-sized" (a capturing
/// closure is `Fn`, `Send`, `Sync` and even `Copy` like a non-capturing one).
pub trait Target<Args, Marker>: sealed::Sealed<Args, Marker> + Send + Sync + 'static {
    /// What the target returns.
    type Output;
    /// Calls the target.
    #[doc(hidden)]
    fn call(&self, args: Args) -> Self::Output;
}

macro_rules! impl_target {
    ($($a:ident),*) => {
        impl<F, R, $($a,)*> sealed::Sealed<($($a,)*), fn($($a),*) -> R> for F where F: Fn($($a),*) -> R {}
        impl<F, R, $($a,)*> Target<($($a,)*), fn($($a),*) -> R> for F
        where
            F: Fn($($a),*) -> R + Send + Sync + 'static,
        {
            type Output = R;
            #[allow(non_snake_case)]
            fn call(&self, args: ($($a,)*)) -> R {
                let ($($a,)*) = args;
                self($($a),*)
            }
        }
    };
}

// One parameter: the argument is the value itself, not a 1-tuple.
impl<F, A, R> sealed::Sealed<A, fn(A) -> R> for F where F: Fn(A) -> R {}
impl<F, A, R> Target<A, fn(A) -> R> for F
where
    F: Fn(A) -> R + Send + Sync + 'static,
{
    type Output = R;
    fn call(&self, args: A) -> R {
        self(args)
    }
}

impl_target!();
impl_target!(A1, A2);
impl_target!(A1, A2, A3);
impl_target!(A1, A2, A3, A4);
impl_target!(A1, A2, A3, A4, A5);
impl_target!(A1, A2, A3, A4, A5, A6);
impl_target!(A1, A2, A3, A4, A5, A6, A7);
impl_target!(A1, A2, A3, A4, A5, A6, A7, A8);

/// What a [`Process`](crate::Process) target may return: `()`, or a `Result<(), E>` whose
/// error is printed to stderr and makes the exit code 1 (as `main` does).
pub trait Outcome {
    /// The process's exit code for this outcome.
    fn exit_code(self) -> i32;
}

impl Outcome for () {
    fn exit_code(self) -> i32 {
        0
    }
}

impl<E: Debug> Outcome for std::result::Result<(), E> {
    fn exit_code(self) -> i32 {
        match self {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("Error: {e:?}");
                1
            }
        }
    }
}

/// The fixed-size message a child sends back when its target is done (or could not run).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Report {
    /// The target returned; for a call entry the value follows in the next message.
    Returned,
    /// The target panicked.
    Panicked { message: String, location: String },
    /// The target could not be run or its value could not be sent.
    Failed(String),
    /// The child runs a different build than its parent.
    ImageMismatch { parent: String, child: String },
}

/// Entry functions: given the channel to the parent and the encoded args if they came
/// inline (read from the channel otherwise), run and report; return the exit code.
pub(crate) type EntryFn = fn(&Connection, Option<&[u8]>) -> i32;

/// Checks at compile time that the target captures nothing.
pub(crate) const fn assert_no_captures<F>() {
    assert!(
        std::mem::size_of::<F>() == 0,
        "a multiprocess target must be a fn item or a closure that captures nothing, because it runs in another process: pass state in the args instead"
    );
}

/// The offset that identifies the entry for `Process` targets of this type.
pub(crate) fn process_entry<F, A, M>() -> i64
where
    F: Target<A, M>,
    A: DeserializeOwned,
    F::Output: Outcome,
{
    const { assert_no_captures::<F>() };
    image::code_offset(run_process::<F, A, M> as EntryFn as usize)
}

/// The offset that identifies the entry for `spawn` (value-returning) targets.
pub(crate) fn call_entry<F, A, M>() -> i64
where
    F: Target<A, M>,
    A: DeserializeOwned,
    F::Output: Serialize,
{
    const { assert_no_captures::<F>() };
    image::code_offset(run_call::<F, A, M> as EntryFn as usize)
}

thread_local! {
    static LAST_PANIC: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// When set (pool workers), panics are recorded and returned to the caller as values
/// without being printed: the parent reports them.
static QUIET_PANICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stops the panic hook from printing (the panics are still recorded).
pub(crate) fn quiet_panics() {
    QUIET_PANICS.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The message and location of the panic whose payload this is (recorded by the hook).
pub(crate) fn panic_details(payload: Box<dyn std::any::Any + Send>) -> (String, String) {
    LAST_PANIC
        .with(|p| p.borrow_mut().take())
        .unwrap_or_else(|| (payload_message(&*payload), String::new()))
}

/// The text of a panic payload (`&str` or `String`, as `panic!` makes them).
fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "Box<dyn Any>".into())
}

/// Set in a child started by `fork()` from a threaded parent: its panic hook must not
/// call the inherited one (see [`prepare_fork_panic_hook`]).
static FORK_CHILD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs (once, in a child) a panic hook that remembers the message and location of
/// the last panic on this thread and then reports it.
///
/// In a fresh image (spawn, forkserver) the report is the standard one (the previous
/// hook). A child forked from the user's process must not even *set* a hook: the hook's
/// lock may have been held by another thread of the parent at the moment of the fork.
/// Its hook was installed in the parent before the fork ([`prepare_fork_panic_hook`]);
/// here it is only switched to child behaviour.
pub(crate) fn install_panic_recorder(fresh_image: bool) {
    if !fresh_image {
        FORK_CHILD.store(true, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if !QUIET_PANICS.load(std::sync::atomic::Ordering::Relaxed) {
            previous(info);
        }
        record_panic(info.payload(), info.location());
    }));
}

/// Called in the parent before its first `fork()` child: wraps the current panic hook in
/// one that, in the parent, only calls it, and in a forked child records the panic and
/// prints a plain one-line report instead (the inherited hook may need locks that another
/// thread of the parent held at the moment of the fork, such as the backtrace lock).
///
/// A hook the user sets *after* their first `Fork` start replaces this one; children
/// forked after that still report panics, without the location.
pub(crate) fn prepare_fork_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !FORK_CHILD.load(std::sync::atomic::Ordering::Relaxed) {
                return previous(info);
            }
            if !QUIET_PANICS.load(std::sync::atomic::Ordering::Relaxed) {
                use std::io::Write;
                let location = info.location().map(|l| l.to_string()).unwrap_or_default();
                let _ = writeln!(
                    std::io::stderr(),
                    "process {} panicked at {location}:\n{}",
                    std::process::id(),
                    payload_message(info.payload())
                );
            }
            record_panic(info.payload(), info.location());
        }));
    });
}

fn record_panic(payload: &(dyn std::any::Any + Send), location: Option<&panic::Location<'_>>) {
    let message = payload_message(payload);
    let location = location
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    LAST_PANIC.with(|p| *p.borrow_mut() = Some((message, location)));
}

/// Decodes the args and runs the target, catching a panic.
fn invoke<F, A, M>(
    conn: &Connection,
    inline: Option<&[u8]>,
) -> std::result::Result<F::Output, Report>
where
    F: Target<A, M>,
    A: DeserializeOwned,
{
    let args: A = match inline {
        Some(bytes) => reduction::decode(bytes, &mut Default::default()),
        None => conn.recv(),
    }
    .map_err(|e| Report::Failed(format!("could not receive the arguments: {e}")))?;
    // SAFETY: F is zero-sized (checked at compile time when the entry offset was taken)
    // and the parent held a value of it: it is a fn item or a closure without captures.
    let target: F = unsafe { image::conjure_zst::<F>() };
    match panic::catch_unwind(AssertUnwindSafe(|| target.call(args))) {
        Ok(v) => Ok(v),
        Err(payload) => {
            let (message, location) = panic_details(payload);
            Err(Report::Panicked { message, location })
        }
    }
}

/// [`Report::Returned`] as a whole frame: its length (4 bytes) and the 8 bytes the
/// encoder writes (both checked by a test). The common report goes out without the
/// encoder and the connection's sending code, which a new child would otherwise fault in
/// for this one message.
const RETURNED_FRAME: [u8; 12] = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0];

/// Sends [`Report::Returned`]. The parent may be gone or may not care (a plain
/// `Process`): nothing to do on error.
fn send_returned(conn: &Connection) {
    // A copy on the stack, not a reference to read-only data (another page). The channel
    // is the child's own: nothing else writes to it meanwhile.
    let frame = RETURNED_FRAME;
    let _ = crate::sys::process::write_all_plain(conn.as_fd(), &frame);
}

/// Sends any other report (see [`send_returned`]).
fn send_report(conn: &Connection, report: &Report) {
    let _ = conn.send(report);
}

fn run_process<F, A, M>(conn: &Connection, args: Option<&[u8]>) -> i32
where
    F: Target<A, M>,
    A: DeserializeOwned,
    F::Output: Outcome,
{
    match invoke::<F, A, M>(conn, args) {
        Ok(out) => {
            let code = out.exit_code();
            send_returned(conn);
            code
        }
        Err(report) => {
            if let Report::Failed(why) = &report {
                eprintln!("multiprocess: {why}");
            }
            send_report(conn, &report);
            1
        }
    }
}

fn run_call<F, A, M>(conn: &Connection, args: Option<&[u8]>) -> i32
where
    F: Target<A, M>,
    A: DeserializeOwned,
    F::Output: Serialize,
{
    match invoke::<F, A, M>(conn, args) {
        Ok(value) => match reduction::encode(&value) {
            Ok(enc) => {
                send_returned(conn);
                let _ = conn.send_frame(&enc.bytes, &enc.fds);
                0
            }
            Err(e) => {
                send_report(
                    conn,
                    &Report::Failed(format!("could not send the return value: {e}")),
                );
                1
            }
        },
        Err(report) => {
            send_report(conn, &report);
            1
        }
    }
}

/// Resolves an entry offset sent by a parent (a child's entry, a pool's chunk runner or
/// initializer) to the function of type `T` it denotes in this process.
///
/// # Errors
/// [`Error::Protocol`](crate::Error::Protocol) if the offset points outside this
/// program's code.
///
/// # Safety
/// The offset must come from [`image::code_offset`] on a function of type `T` (such as
/// [`process_entry`] or [`call_entry`]) in a process whose build id equals ours.
pub(crate) unsafe fn resolve<T: Copy>(offset: i64) -> Result<T> {
    // SAFETY: forwarded to the caller.
    unsafe { image::fn_at::<T>(offset) }.ok_or_else(|| {
        crate::Error::protocol(format!(
            "entry offset {offset:#x} is outside this program's code"
        ))
    })
}

/// Receives a value that a call entry sent after [`Report::Returned`].
pub(crate) fn recv_value<R: DeserializeOwned>(conn: &Connection) -> Result<R> {
    conn.recv()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_returned_report_goes_out_as_the_encoder_and_framing_write_it() {
        let enc = crate::reduction::encode(&Report::Returned).unwrap();
        let (head, payload) = RETURNED_FRAME.split_at(4);
        assert_eq!(enc.bytes, payload);
        let header = crate::connection::framing::Header::for_len(payload.len() as u64);
        assert_eq!(header.as_bytes(), head);
        let back: Report = crate::reduction::decode(payload, &mut Default::default()).unwrap();
        assert!(matches!(back, Report::Returned));
    }
}
