//! Process behaviour under every start method: real children, real signals, real crashes.
#![allow(unsafe_code)] // this test drives the OS directly (libc), as an attacker or a witness would

mod common;

use common::{joined, wait_until, Reaper, LONG};

use multiprocess::{
    active_children, current_process, get_context, parent_process, pipe, Connection, Error,
    ExitStatus, Process, StartMethod,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Waits (bounded) until `pid` has exited, using a pidfd, which works for any process.
fn wait_gone(pid: u32, within: Duration) -> bool {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return true; // no such process any more
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, within.as_millis() as i32) };
    r == 1
}

/// Whether `pid` still has an entry in /proc (a zombie has one).
fn proc_entry_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

each_method!(
    clean_exit,
    exit_status_3,
    abort_is_sigabrt,
    segfault_is_sigsegv,
    panic_is_exitcode_1_and_typed,
    terminate_and_kill,
    join_timeout_then_kill,
    identity_inside_child,
    values_and_arguments,
    large_return_value,
    args_of_every_size_around_the_inline_bound,
    concurrent_starts_each_get_their_own_boot_message,
    connection_in_args,
    parent_sigkill_takes_children,
    target_return_joins_and_terminates_children,
    dropped_process_is_reaped,
    mid_message_death_is_an_error,
    children_start_with_only_their_descriptors,
    children_see_the_parents_environment,
);

fn bind_now_var() -> Option<String> {
    std::env::var("LD_BIND_NOW").ok()
}

/// A user's own `LD_BIND_NOW` reaches the children too (the check above, run again in a
/// test process that has it set).
#[test]
fn a_users_bind_now_reaches_forkserver_children() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "children_see_the_parents_environment::forkserver",
            "--test-threads=1",
        ])
        .env("LD_BIND_NOW", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The forkserver's own start-up settings (it binds symbols eagerly) must not leak into
/// the environment of the children it forks.
fn children_see_the_parents_environment(m: StartMethod) {
    let in_parent = bind_now_var();
    let in_child = get_context(m)
        .spawn(bind_now_var, ())
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(in_child, in_parent, "{m}: LD_BIND_NOW in the child");
}

fn nothing() {}

fn clean_exit(m: StartMethod) {
    let p = Reaper(get_context(m).process(nothing, ()));
    assert!(!p.0.is_alive());
    assert_eq!(p.0.exitcode(), None);
    p.0.start().unwrap();
    let pid = p.0.pid().expect("pid after start");
    assert_eq!(joined(&p.0), 0);
    assert!(!p.0.is_alive());
    assert_eq!(p.0.exit_status(), Some(ExitStatus::Exited(0)));
    assert!(
        !proc_entry_exists(pid),
        "joined child must be reaped, not a zombie"
    );
    assert!(
        matches!(p.0.start(), Err(Error::Process(_))),
        "a process starts once"
    );
}

fn exit_3() {
    std::process::exit(3)
}

fn exit_status_3(m: StartMethod) {
    let p = Reaper(get_context(m).process(exit_3, ()));
    p.0.start().unwrap();
    assert_eq!(joined(&p.0), 3);
    match get_context(m)
        .spawn(|()| -> u8 { std::process::exit(3) }, ())
        .unwrap()
        .join()
    {
        Err(Error::WorkerDied {
            status: ExitStatus::Exited(3),
            task: None,
            ..
        }) => {}
        other => panic!("expected WorkerDied(exit 3), got {other:?}"),
    }
}

fn abort_is_sigabrt(m: StartMethod) {
    let p = Reaper(get_context(m).process(|| -> () { std::process::abort() }, ()));
    p.0.start().unwrap();
    assert_eq!(joined(&p.0), -libc::SIGABRT);
    match get_context(m)
        .spawn(|()| -> u8 { std::process::abort() }, ())
        .unwrap()
        .join()
    {
        Err(Error::WorkerDied {
            status: ExitStatus::Signaled(libc::SIGABRT),
            ..
        }) => {}
        other => panic!("expected WorkerDied(SIGABRT), got {other:?}"),
    }
}

/// A real memory fault: a write to a page mapped without access.
fn segfault() -> u8 {
    // SAFETY: maps one fresh page with no access rights; the volatile write to it faults
    // in hardware (SIGSEGV), which is the point of this test.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(page, libc::MAP_FAILED);
        std::ptr::write_volatile(page.cast::<u8>(), 1);
    }
    0
}

fn segfault_is_sigsegv(m: StartMethod) {
    let p = Reaper(get_context(m).process(
        || {
            segfault();
        },
        (),
    ));
    p.0.start().unwrap();
    assert_eq!(joined(&p.0), -libc::SIGSEGV);
    match get_context(m).spawn(|()| segfault(), ()).unwrap().join() {
        Err(Error::WorkerDied {
            status: ExitStatus::Signaled(libc::SIGSEGV),
            ..
        }) => {}
        other => panic!("expected WorkerDied(SIGSEGV), got {other:?}"),
    }
}

fn boom(n: u32) -> u32 {
    if n > 1 {
        panic!("boom at {n}");
    }
    n
}

fn panic_is_exitcode_1_and_typed(m: StartMethod) {
    let p = Reaper(get_context(m).process(
        |n: u32| {
            boom(n);
        },
        7,
    ));
    p.0.start().unwrap();
    assert_eq!(joined(&p.0), 1);
    match get_context(m).spawn(boom, 5).unwrap().join() {
        Err(Error::Panicked { message, location }) => {
            assert_eq!(message, "boom at 5");
            assert!(
                location.starts_with("tests/process.rs:"),
                "location {location:?}"
            );
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    // A Result-returning target: Err means exit code 1.
    let p = Reaper(get_context(m).process(|()| -> Result<(), String> { Err("nope".into()) }, ()));
    p.0.start().unwrap();
    assert_eq!(joined(&p.0), 1);
}

fn sleep_long() {
    std::thread::sleep(Duration::from_secs(600));
}

fn terminate_and_kill(m: StartMethod) {
    let p = Reaper(get_context(m).process(sleep_long, ()));
    p.0.start().unwrap();
    assert!(p.0.is_alive());
    p.0.terminate().unwrap();
    assert_eq!(joined(&p.0), -libc::SIGTERM);
    assert!(!p.0.is_alive());
    p.0.terminate()
        .expect("terminating an ended process is a no-op");

    let q = Reaper(get_context(m).process(sleep_long, ()));
    q.0.start().unwrap();
    q.0.kill().unwrap();
    assert_eq!(joined(&q.0), -libc::SIGKILL);
    assert_eq!(q.0.exit_status(), Some(ExitStatus::Signaled(libc::SIGKILL)));
}

fn join_timeout_then_kill(m: StartMethod) {
    let p = Reaper(get_context(m).process(sleep_long, ()));
    p.0.start().unwrap();
    let t = Instant::now();
    assert!(!p.0.join_timeout(Duration::from_millis(50)).unwrap());
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert!(p.0.is_alive());
    assert!(
        matches!(p.0.close(), Err(Error::Process(_))),
        "close on a live process is an error"
    );
    p.0.kill().unwrap();
    assert_eq!(joined(&p.0), -9);
    p.0.close().unwrap();
    assert!(matches!(p.0.join(), Err(Error::Closed(_))));
}

fn who_am_i() -> (String, u32, Option<u32>, Option<u32>, Vec<u32>) {
    let me = current_process();
    (
        me.name().to_string(),
        me.pid(),
        me.parent_pid(),
        parent_process().map(|p| p.pid()),
        me.authkey().to_vec().into_iter().map(u32::from).collect(),
    )
}

fn identity_inside_child(m: StartMethod) {
    let ctx = get_context(m);
    let named = ctx
        .builder()
        .name("Test")
        .spawn(|()| who_am_i(), ())
        .unwrap();
    let pid = named.pid();
    let (name, child_pid, parent, parent2, key) = named.join().unwrap();
    assert_eq!(name, "Test");
    assert_eq!(child_pid, pid);
    assert_eq!(parent, Some(std::process::id()));
    assert_eq!(parent2, Some(std::process::id()));
    let my_key: Vec<u32> = current_process()
        .authkey()
        .iter()
        .copied()
        .map(u32::from)
        .collect();
    assert_eq!(key, my_key, "children inherit the authkey");

    let a = ctx.process(nothing, ());
    let b = ctx.process(nothing, ());
    let (na, nb) = (a.name(), b.name());
    let n: u32 = na.strip_prefix("Process-").unwrap().parse().unwrap();
    assert_eq!(nb, format!("Process-{}", n + 1), "default names count up");
    let h = ctx
        .spawn(|()| current_process().name().to_string(), ())
        .unwrap();
    assert!(h.process().name().starts_with("Process-"));
    assert_eq!(h.process().name(), h.join().unwrap());
    // A child's own children are named Process-N:1.
    let nested = ctx
        .spawn(
            |()| {
                multiprocess::spawn(|()| current_process().name().to_string(), ())
                    .unwrap()
                    .join()
                    .unwrap()
            },
            (),
        )
        .unwrap();
    let outer = nested.process().name();
    assert_eq!(nested.join().unwrap(), format!("{outer}:1"));
}

fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn values_and_arguments(m: StartMethod) {
    let ctx = get_context(m);
    assert_eq!(ctx.spawn(add, (2, 40)).unwrap().join().unwrap(), 42);
    assert_eq!(
        ctx.spawn(|()| "no args".to_string(), ())
            .unwrap()
            .join()
            .unwrap(),
        "no args"
    );
    let words = vec!["a".to_string(), "bc".to_string()];
    let h = ctx
        .spawn(
            |w: Vec<String>| w.iter().map(|s| s.len()).sum::<usize>(),
            words,
        )
        .unwrap();
    assert_eq!(h.join().unwrap(), 3);
    let h = ctx
        .spawn(|(s, n): (String, usize)| s.repeat(n), ("ab".to_string(), 3))
        .unwrap();
    assert_eq!(h.join().unwrap(), "ababab");
}

fn large_return_value(m: StartMethod) {
    // Bigger than any socket buffer: the parent must read while the child writes.
    let h = get_context(m)
        .spawn(|n: usize| (0..n as u64).collect::<Vec<u64>>(), 2_000_000)
        .unwrap();
    let v = h.join().unwrap();
    assert_eq!(v.len(), 2_000_000);
    assert_eq!(v[1_999_999], 1_999_999);
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().enumerate().fold(0u64, |acc, (i, b)| {
        acc.wrapping_mul(31).wrapping_add(u64::from(*b) ^ i as u64)
    })
}

/// What a child saw of its args and of itself: its name, the args' length and checksum.
fn weigh(bytes: Vec<u8>) -> (String, usize, u64) {
    let name = current_process().name().to_string();
    (name, bytes.len(), checksum(&bytes))
}

fn args_of_every_size_around_the_inline_bound(m: StartMethod) {
    // Small args travel with the start request (fork, forkserver) and the child decodes
    // its identity when asked; larger ones are written to the channel. Both ways, around
    // the bound (16 KiB with the boot message), deliver the same bytes and identity.
    let ctx = get_context(m);
    for len in [0, 1, 16_000, 16_300, 16_384, 16_500, 40_000, 300_000] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let name = format!("Sized-{len}");
        let h = ctx
            .builder()
            .name(name.clone())
            .spawn(weigh, bytes.clone())
            .unwrap();
        let expected = (name, len, checksum(&bytes));
        assert_eq!(h.join().unwrap(), expected, "{m}: {len} bytes");
    }
}

fn name_and_arg(arg: u64) -> (String, u64) {
    (current_process().name().to_string(), arg)
}

fn concurrent_starts_each_get_their_own_boot_message(m: StartMethod) {
    // Starts from four threads at once: each child must see its own name and args (the
    // forkserver reuses one buffer for every request; each child reads its own copy).
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                let ctx = get_context(m);
                for k in 0..8u64 {
                    let arg = t * 100 + k;
                    let name = format!("T{t}-{k}");
                    let h = ctx
                        .builder()
                        .name(name.clone())
                        .spawn(name_and_arg, arg)
                        .unwrap();
                    assert_eq!(h.join().unwrap(), (name, arg));
                }
            });
        }
    });
}

fn echo_on(conn: Connection) {
    let msg: String = conn.recv().unwrap();
    conn.send(&format!("{msg} from {}", current_process().name()))
        .unwrap();
}

fn connection_in_args(m: StartMethod) {
    let (ours, theirs) = pipe().unwrap();
    let p = Reaper(get_context(m).builder().name("Echo").build(echo_on, theirs));
    p.0.start().unwrap();
    ours.send("hi").unwrap();
    assert!(ours.poll(Some(LONG)).unwrap());
    assert_eq!(ours.recv::<String>().unwrap(), "hi from Echo");
    assert_eq!(joined(&p.0), 0);
}

/// In the middle process: start a grandchild from a thread that then exits, report the
/// grandchild's pid, then wait to be killed.
fn middle(args: (Connection, String)) {
    let (conn, method) = args;
    let method: StartMethod = method.parse().unwrap();
    let grandchild = std::thread::spawn(move || {
        let g = get_context(method).process(sleep_long, ());
        g.start().unwrap();
        g.pid().unwrap()
    })
    .join()
    .unwrap();
    conn.send(&grandchild).unwrap();
    sleep_long();
}

fn parent_sigkill_takes_children(m: StartMethod) {
    let (ours, theirs) = pipe().unwrap();
    let p = Reaper(get_context(m).process(middle, (theirs, m.name().to_string())));
    p.0.start().unwrap();
    assert!(ours.poll(Some(LONG)).unwrap());
    let grandchild: u32 = ours.recv().unwrap();
    assert!(
        !wait_gone(grandchild, Duration::from_millis(100)),
        "grandchild should outlive the thread that started it"
    );
    p.0.kill().unwrap();
    assert_eq!(joined(&p.0), -9);
    assert!(
        wait_gone(grandchild, Duration::from_secs(1)),
        "grandchild {grandchild} survived its parent's SIGKILL by more than 1 s"
    );
}

fn report_pid_then_sleep(conn: Connection) {
    conn.send(&std::process::id()).unwrap();
    sleep_long();
}

fn finish_later(conn: Connection) {
    // Wait for the go signal, then report completion.
    let _: u8 = conn.recv().unwrap();
    conn.send("finished").unwrap();
}

fn parent_of_two(args: (Connection, Connection, String)) {
    let (report, worker_conn, method) = args;
    let ctx = get_context(method.parse().unwrap());
    let (mine, daemon_conn) = pipe().unwrap();
    ctx.builder()
        .daemon(true)
        .build(report_pid_then_sleep, daemon_conn)
        .start()
        .unwrap();
    // Wait until the daemon runs, and pass its pid on.
    report.send(&mine.recv::<u32>().unwrap()).unwrap();
    ctx.process(finish_later, worker_conn).start().unwrap();
    // Returning: the daemon must be terminated and the other child waited for.
}

fn target_return_joins_and_terminates_children(m: StartMethod) {
    let (d_ours, d_theirs) = pipe().unwrap();
    let (w_ours, w_theirs) = pipe().unwrap();
    let p =
        Reaper(get_context(m).process(parent_of_two, (d_theirs, w_theirs, m.name().to_string())));
    p.0.start().unwrap();
    assert!(d_ours.poll(Some(LONG)).unwrap());
    let daemon_pid: u32 = d_ours.recv().unwrap();
    // The parent's target has returned (or is about to): it must wait for the worker.
    assert!(
        !p.0.join_timeout(Duration::from_millis(100)).unwrap(),
        "the parent must wait for its non-daemon child"
    );
    w_ours.send(&1u8).unwrap();
    assert_eq!(w_ours.recv::<String>().unwrap(), "finished");
    assert_eq!(joined(&p.0), 0);
    assert!(
        wait_gone(daemon_pid, Duration::from_secs(5)),
        "daemonic child was not terminated"
    );
}

fn wait_for_byte(conn: Connection) {
    let _ = conn.recv::<u8>();
}

fn dropped_process_is_reaped(m: StartMethod) {
    let (ours, theirs) = pipe().unwrap();
    let p = get_context(m).process(wait_for_byte, theirs);
    p.start().unwrap();
    let pid = p.pid().unwrap();
    drop(p);
    assert!(proc_entry_exists(pid));
    assert!(
        active_children().iter().any(|c| c.pid() == Some(pid)),
        "a detached child is still an active child"
    );
    ours.send(&1u8).unwrap();
    assert!(
        wait_until(LONG, || !proc_entry_exists(pid)),
        "detached child {pid} was not reaped (zombie)"
    );
    assert!(!active_children().iter().any(|c| c.pid() == Some(pid)));
}

fn die_while_answering(n: usize) -> Vec<u64> {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: ends the process at once, on purpose, while the main thread is
        // encoding or sending its answer.
        unsafe { libc::_exit(0) }
    });
    (0..n as u64).collect()
}

fn mid_message_death_is_an_error(m: StartMethod) {
    let h = get_context(m)
        .spawn(die_while_answering, 50_000_000)
        .unwrap();
    match h.join() {
        Err(Error::WorkerDied {
            status: ExitStatus::Exited(0),
            ..
        }) => {}
        other => panic!("expected WorkerDied, got {:?}", other.map(|v| v.len())),
    }
}

#[test]
fn active_children_lists_and_reaps() {
    let (ours, theirs) = pipe().unwrap();
    let p = Reaper(Process::new(wait_for_byte, theirs));
    p.0.start().unwrap();
    let pid = p.0.pid().unwrap();
    assert!(active_children().iter().any(|c| c.pid() == Some(pid)));
    ours.send(&1u8).unwrap();
    assert!(wait_gone(pid, LONG));
    assert!(!active_children().iter().any(|c| c.pid() == Some(pid)));
    assert!(
        !proc_entry_exists(pid),
        "active_children() reaps finished children"
    );
}

#[test]
fn unstarted_process_errors() {
    let p = Process::new(nothing, ());
    assert!(matches!(p.join(), Err(Error::Process(_))));
    assert!(matches!(p.terminate(), Err(Error::Process(_))));
    assert_eq!(p.pid(), None);
    assert!(p.set_daemon(true).is_ok());
    p.close().unwrap();
    assert!(matches!(p.start(), Err(Error::Closed(_))));
}

fn examples_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples")
}

#[test]
fn another_build_is_refused_cleanly() {
    // Any other program that links multiprocess is "another build" of a child.
    let other = examples_dir().join("cpu_count");
    assert!(
        other.exists(),
        "{} is built by `cargo test`",
        other.display()
    );
    for m in [StartMethod::Spawn, StartMethod::Forkserver] {
        let mut ctx = get_context(m);
        ctx.set_executable(&other);
        match ctx.spawn(add, (1, 2)).unwrap().join() {
            Err(Error::ImageMismatch { parent, child }) => assert_ne!(parent, child),
            other => panic!("{m}: expected ImageMismatch, got {other:?}"),
        }
    }
}

/// Run by `main_exit_terminates_daemons_and_joins_others` in a separate test process,
/// whose normal exit is what is being tested.
#[test]
#[ignore = "helper, run by another test"]
fn helper_exit_with_children() {
    let Ok(method) = std::env::var("MP_HELPER_METHOD") else {
        return;
    };
    let ctx = get_context(method.parse().unwrap());
    let d = ctx.builder().daemon(true).build(sleep_long, ());
    d.start().unwrap();
    let w = ctx.process(|ms: u64| std::thread::sleep(Duration::from_millis(ms)), 300);
    w.start().unwrap();
    println!("PIDS {} {}", d.pid().unwrap(), w.pid().unwrap());
}

#[test]
fn main_exit_terminates_daemons_and_joins_others() {
    for m in ["fork", "spawn", "forkserver"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "helper_exit_with_children",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MP_HELPER_METHOD", m)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{m}: helper failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let at = text
            .find("PIDS ")
            .unwrap_or_else(|| panic!("{m}: no PIDS line in {text}"));
        let line = text[at + 5..].lines().next().unwrap();
        let pids: Vec<u32> = line
            .split_whitespace()
            .take(2)
            .map(|s| s.parse().unwrap())
            .collect();
        // The helper process has exited: its daemon was terminated, and its worker was
        // waited for (so it ran to its end); neither is left running.
        assert!(
            wait_gone(pids[0], Duration::from_secs(1)),
            "{m}: daemon survived a normal exit"
        );
        assert!(
            wait_gone(pids[1], Duration::from_millis(10)),
            "{m}: worker not joined at exit"
        );
    }
}

#[test]
fn process_handles_are_shared() {
    let p = Process::new(sleep_long, ());
    p.start().unwrap();
    let q = p.clone();
    let joiner = std::thread::spawn(move || {
        q.join().unwrap();
        q.exitcode()
    });
    p.terminate().unwrap();
    assert_eq!(joiner.join().unwrap(), Some(-15));
    assert_eq!(p.exitcode(), Some(-15));
}

fn open_fds(_: Connection) -> usize {
    // Count while the directory handle itself is open; it is not ours to count.
    std::fs::read_dir("/proc/self/fd").unwrap().count() - 1
}

fn children_start_with_only_their_descriptors(m: StartMethod) {
    // Open descriptors in the parent that must not leak into the child.
    let _noise: Vec<_> = (0..5).map(|_| pipe().unwrap()).collect();
    let (_keep, travels) = pipe().unwrap();
    let n = get_context(m)
        .spawn(open_fds, travels)
        .unwrap()
        .join()
        .unwrap();
    // 0, 1, 2, the channel to the parent, and the connection that travelled in args.
    assert_eq!(
        n, 5,
        "{m}: a child sees only stdio, its channel and its args"
    );
}

/// This process's forkserver (a child of ours whose role variable says so), if running.
fn forkserver_pid() -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): state, ppid, ...
        let ppid: u32 = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let server = env
            .split(|b| *b == 0)
            .any(|kv| kv.starts_with(b"MULTIPROCESS_ROLE=forkserver:"));
        (ppid == me && server).then_some(pid)
    })
}

/// Run by `a_killed_forkserver_is_replaced` in a separate test process, so that killing
/// its forkserver touches no other test.
#[test]
#[ignore = "helper, run by another test"]
fn helper_kill_the_forkserver() {
    if std::env::var_os("MP_HELPER_KILL_SERVER").is_none() {
        return;
    }
    let ctx = get_context(StartMethod::Forkserver);
    let p = ctx.process(nothing, ());
    p.start().unwrap();
    p.join().unwrap();
    let old = forkserver_pid().expect("a forkserver runs after a start");
    // SAFETY: sends a signal to a pid we just found as our own child.
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGKILL) }, 0);
    assert!(
        wait_gone(old, Duration::from_secs(10)),
        "the server did not die"
    );
    // Starts go on: the next one finds the server gone and starts another.
    for k in 0..3u64 {
        let h = ctx.spawn(|k: u64| k * 2, k).unwrap();
        assert_eq!(h.join().unwrap(), k * 2);
    }
    let new = forkserver_pid().expect("a new forkserver");
    println!("SERVERS {old} {new}");
}

#[test]
fn a_killed_forkserver_is_replaced() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_kill_the_forkserver",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MP_HELPER_KILL_SERVER", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helper failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at = text
        .find("SERVERS ")
        .unwrap_or_else(|| panic!("no SERVERS line in {text}"));
    let line = text[at + 8..].lines().next().unwrap();
    let pids: Vec<u32> = line
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_ne!(pids[0], pids[1], "the same server after a SIGKILL");
}
