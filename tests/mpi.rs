//! The MPI backend of `Pool`, for real: each test runs this very test binary under
//! `mpirun -n 3` (rank 0 runs only that test; ranks 1 and 2 become agents before `main`),
//! under a hard `timeout`, and checks what the job printed and how it ended.
//!
//! The part of a test that runs inside the job is marked by the `INNER` variable; it ends
//! by printing a marker line, so that a test that did not run cannot pass.
#![cfg(feature = "mpi")]

use multiprocess::{mpi, Error, ExitStatus, Pool};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

const INNER: &str = "MULTIPROCESS_MPI_TEST_INNER";
/// The hard limit for one job, in seconds.
const JOB_TIMEOUT: &str = "120";

/// One job at a time: the machine is small and the timeouts inside are real.
static JOBS: Mutex<()> = Mutex::new(());

fn inner() -> bool {
    std::env::var_os(INNER).is_some()
}

/// Open MPI refuses to run as root unless told it is fine (CI runs as root).
fn mpirun_cmd() -> Command {
    let mut c = Command::new("timeout");
    c.args([
        "-k",
        "5",
        JOB_TIMEOUT,
        "mpirun",
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env(INNER, "1")
    .env_remove("RUST_BACKTRACE");
    c
}

fn test_args(exe: &Path, test: &str) -> Vec<String> {
    vec![
        exe.display().to_string(),
        "--exact".into(),
        test.into(),
        "--nocapture".into(),
        "--test-threads".into(),
        "1".into(),
    ]
}

/// Runs `test` of this binary as rank 0 of `mpirun -n 3`.
fn job(test: &str) -> Output {
    let _one = JOBS.lock().unwrap_or_else(|p| p.into_inner());
    let exe = std::env::current_exe().unwrap();
    mpirun_cmd()
        .args(["-n", "3", "-x", INNER])
        .args(test_args(&exe, test))
        .output()
        .expect("mpirun (apt-get install openmpi-bin)")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn assert_job_passed(o: &Output, marker: &str) {
    let (out, err) = text(o);
    assert!(
        o.status.success() && out.contains(marker),
        "the MPI job failed ({:?})\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// Which rank's agent ran this task (its workers inherit the rank's environment).
fn served_by(x: u64) -> (u64, String) {
    std::thread::sleep(Duration::from_millis(2));
    (
        x * x,
        std::env::var("OMPI_COMM_WORLD_RANK").unwrap_or_default(),
    )
}

fn square(x: u64) -> u64 {
    x * x
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[test]
fn results_come_back_in_order_from_every_agent() {
    if !inner() {
        return assert_job_passed(
            &job("results_come_back_in_order_from_every_agent"),
            "INNER-DONE results",
        );
    }
    assert!(mpi::is_launched());
    assert_eq!((mpi::rank(), mpi::world_size()), (Some(0), Some(3)));
    let agents = mpi::agents().unwrap();
    assert_eq!(agents.iter().map(|a| a.rank).collect::<Vec<_>>(), [1, 2]);
    let pool = Pool::new(0).unwrap();
    let total: u32 = agents.iter().map(|a| a.workers).sum();
    assert_eq!(pool.processes(), total as usize);

    let got = pool.map_chunked(served_by, 0..60u64, 1).unwrap();
    assert_eq!(
        got.iter().map(|r| r.0).collect::<Vec<_>>(),
        (0..60u64).map(|x| x * x).collect::<Vec<_>>()
    );
    let ranks: BTreeSet<String> = got.into_iter().map(|r| r.1).collect();
    assert_eq!(ranks, BTreeSet::from(["1".to_string(), "2".to_string()]));

    assert_eq!(
        pool.map(square, 0..10_000u64).unwrap(),
        (0..10_000u64).map(|x| x * x).collect::<Vec<_>>()
    );
    assert_eq!(pool.starmap(add, vec![(1, 2), (3, 4)]).unwrap(), [3, 7]);
    assert_eq!(pool.apply_async(square, 12).unwrap().get().unwrap(), 144);
    let lazy: Vec<u64> = pool
        .imap_chunked(square, 0.., 3)
        .unwrap()
        .take(100)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(lazy, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    let mut any: Vec<u64> = pool
        .imap_unordered(square, 0..50u64)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    any.sort();
    assert_eq!(any, (0..50u64).map(|x| x * x).collect::<Vec<_>>());
    // Cancelling stops the task on its host; the pool goes on.
    let slow = pool.apply_async(nap, 60_000).unwrap();
    slow.cancel();
    assert!(matches!(slow.get(), Err(Error::Cancelled)));
    assert_eq!(pool.map(square, [7]).unwrap(), [49]);
    // Dropping a pool with work in flight stops it everywhere, at once.
    let doomed = Pool::new(0).unwrap();
    let unfinished = doomed.map_async(nap, vec![60_000u64; 4]).unwrap();
    drop(doomed);
    assert!(matches!(unfinished.get(), Err(Error::Cancelled)));
    // A second pool at the same time, of a size the user chose.
    let small = Pool::builder().processes(1).build().unwrap();
    assert_eq!(small.processes(), 1);
    assert_eq!(small.map(square, [5, 6]).unwrap(), [25, 36]);
    let stats = pool.stats();
    assert!(stats.tasks_completed >= 10_000, "{stats:?}");
    drop(small);
    pool.close();
    pool.join().unwrap();
    // A local pool still works on rank 0 when asked for.
    let local = Pool::builder()
        .processes(1)
        .backend(multiprocess::Backend::Local)
        .build()
        .unwrap();
    let rank = local.apply(served_by, 3).unwrap().1;
    assert_eq!(rank, "0");
    println!("INNER-DONE results");
}

fn misbehave(x: u64) -> u64 {
    match x {
        3 => panic!("boom {x}"),
        5 => std::process::abort(),
        6 => {
            std::thread::sleep(Duration::from_secs(60));
            x
        }
        _ => x * 10,
    }
}

/// Aborts its worker the first time it runs (per marker directory), succeeds after.
fn crash_once(dir: PathBuf) -> u64 {
    if std::fs::create_dir(dir.join("tried")).is_ok() {
        std::process::abort();
    }
    7
}

fn remote_parts(e: &Error) -> (&str, i32, &Error) {
    match e {
        Error::OnHost { host, rank, error } => (host, *rank, error),
        other => panic!("expected Error::OnHost, got {other:?}"),
    }
}

#[test]
fn task_failures_are_typed_and_name_the_task_and_host() {
    if !inner() {
        return assert_job_passed(
            &job("task_failures_are_typed_and_name_the_task_and_host"),
            "INNER-DONE failures",
        );
    }
    let pool = Pool::builder()
        .timeout(Duration::from_millis(500))
        .grace(Duration::from_millis(100))
        .build()
        .unwrap();
    let results: Vec<_> = pool.imap(misbehave, 0..8u64).unwrap().collect();
    let host = hostname();
    for (i, r) in results.iter().enumerate() {
        match i {
            3 | 5 | 6 => {
                let e = r.as_ref().unwrap_err();
                let (h, rank, inner) = remote_parts(e);
                assert_eq!(h, host);
                assert!(rank == 1 || rank == 2, "{e}");
                assert!(e.to_string().contains(&host), "{e}");
                match (i, inner) {
                    (3, Error::Panicked { message, .. }) => assert_eq!(message, "boom 3"),
                    (5, Error::WorkerDied { task, status, .. }) => {
                        assert_eq!(*task, Some(5));
                        assert_eq!(*status, ExitStatus::Signaled(libc::SIGABRT));
                        assert!(e.to_string().contains("task 5"), "{e}");
                    }
                    (6, Error::Timeout { .. }) => assert!(e.is_timeout()),
                    _ => panic!("item {i}: {e:?}"),
                }
                assert!(matches!(
                    (i, e.local()),
                    (3, Error::Panicked { .. })
                        | (5, Error::WorkerDied { .. })
                        | (6, Error::Timeout { .. })
                ));
            }
            _ => assert_eq!(r.as_ref().ok(), Some(&(i as u64 * 10))),
        }
    }
    // `map` gives the first failure in item order; the pool goes on working.
    let e = pool.map(misbehave, [1, 2, 5, 3]).unwrap_err();
    assert!(
        matches!(e.local(), Error::WorkerDied { task: Some(2), .. }),
        "{e:?}"
    );
    assert_eq!(pool.map(square, 0..100u64).unwrap()[99], 99 * 99);

    // With a retry, a task whose worker died runs again on a fresh worker.
    let dir = std::env::temp_dir().join(format!("mp-mpi-retry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let retrying = Pool::builder().processes(1).retries(1).build().unwrap();
    assert_eq!(retrying.apply(crash_once, dir.clone()).unwrap(), 7);
    std::fs::remove_dir_all(&dir).unwrap();
    println!("INNER-DONE failures");
}

#[test]
fn a_failing_main_ends_the_job() {
    if !inner() {
        let o = job("a_failing_main_ends_the_job");
        let (out, err) = text(&o);
        // The test failed inside (status 101), the agents were told to stop, and the job
        // ended on its own rather than at the timeout.
        assert!(
            !o.status.success() && o.status.code() != Some(124),
            "{:?}\n{out}\n{err}",
            o.status
        );
        assert!(out.contains("INNER-STARTED") && (out + &err).contains("rank 0 gives up"));
        return;
    }
    let pool = Pool::new(0).unwrap();
    assert_eq!(pool.map(square, 0..10u64).unwrap()[3], 9);
    println!("INNER-STARTED");
    std::mem::forget(pool); // not even dropped: the exit handler stops the agents
    panic!("rank 0 gives up");
}

fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[test]
fn the_job_ends_when_an_agent_dies() {
    if !inner() {
        let o = job("the_job_ends_when_an_agent_dies");
        let (out, err) = text(&o);
        let all = format!("{out}{err}");
        assert!(
            !o.status.success() && o.status.code() != Some(124),
            "{:?}\n{all}",
            o.status
        );
        assert!(out.contains("INNER-KILLED"), "{all}");
        // mpirun says which rank died, and how.
        assert!(all.contains("rank 2") && all.contains("signal 9"), "{all}");
        return;
    }
    let agents = mpi::agents().unwrap();
    let pool = Pool::new(0).unwrap();
    let pending = pool.map_async(nap, vec![50u64; 40]).unwrap();
    let victim = agents.iter().find(|a| a.rank == 2).unwrap();
    // kill(1), as an operator would.
    let status = Command::new("kill")
        .args(["-9", &victim.pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    println!("INNER-KILLED");
    // MPI ends the job: this never returns normally.
    let _ = pending.get();
    std::thread::sleep(Duration::from_secs(100));
}

/// A copy of this binary whose GNU build-id differs (the code is the same: the check is
/// what is tested).
fn other_build() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut bytes = std::fs::read(&exe).unwrap();
    let pat: &[u8] = &[4, 0, 0, 0];
    let at = (0..bytes.len() - 16)
        .find(|&i| {
            bytes[i..i + 4] == *pat
                && bytes[i + 8..i + 12] == [3, 0, 0, 0]
                && &bytes[i + 12..i + 16] == b"GNU\0"
        })
        .expect("a GNU build-id note");
    bytes[at + 16] ^= 0xff;
    let path = std::env::temp_dir().join(format!("mp-mpi-other-build-{}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn agents_of_another_build_are_refused() {
    let test = "agents_of_another_build_are_refused";
    if !inner() {
        let other = other_build();
        let exe = std::env::current_exe().unwrap();
        let o = {
            let _one = JOBS.lock().unwrap_or_else(|p| p.into_inner());
            mpirun_cmd()
                .args(["-x", INNER, "-n", "1"])
                .args(test_args(&exe, test))
                .args([":", "-n", "2"])
                .args(test_args(&other, test))
                .output()
                .unwrap()
        };
        let _ = std::fs::remove_file(&other);
        let (out, err) = text(&o);
        assert!(o.status.code() != Some(124), "timed out:\n{out}\n{err}");
        assert!(out.contains("INNER-DONE refused"), "{out}\n{err}");
        assert!(err.contains("refusing to serve"), "{out}\n{err}");
        return;
    }
    let e = Pool::new(0).unwrap_err();
    let (_, rank, inner) = remote_parts(&e);
    assert!(rank == 1 || rank == 2);
    assert!(matches!(inner, Error::ImageMismatch { .. }), "{e:?}");
    assert!(mpi::agents().is_err());
    // Local pools are unaffected.
    let local = Pool::builder()
        .processes(1)
        .backend(multiprocess::Backend::Local)
        .build()
        .unwrap();
    assert_eq!(local.apply(square, 4).unwrap(), 16);
    println!("INNER-DONE refused");
}

#[test]
fn without_a_launcher_nothing_changes() {
    if inner() {
        return;
    }
    assert!(!mpi::is_launched());
    assert_eq!(mpi::rank(), None);
    assert!(mpi::agents().is_err());
    let pool = Pool::new(2).unwrap();
    assert_eq!(pool.map(square, [1, 2, 3]).unwrap(), [1, 4, 9]);
    assert!(matches!(
        Pool::builder().backend(multiprocess::Backend::Mpi).build(),
        Err(Error::InvalidArgument(_))
    ));
}

/// Three namespace "hosts" on a bridge, removed on drop.
struct Hosts {
    prefix: String,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script("netns-hosts.sh"))
            .args(["down", &self.prefix, "3"])
            .status();
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/mpi")
        .join(name)
}

fn hostname_of_worker(x: u64) -> String {
    std::thread::sleep(Duration::from_millis(5));
    let _ = x;
    hostname()
}

#[test]
fn results_come_from_three_hosts() {
    if inner() {
        if let Ok(expected) = std::env::var("MP_EXPECTED_HOSTS") {
            let pool = Pool::new(0).unwrap();
            let hosts: BTreeSet<String> = pool
                .map_chunked(hostname_of_worker, 0..120u64, 1)
                .unwrap()
                .into_iter()
                .collect();
            let expected: BTreeSet<String> = expected.split(',').map(str::to_string).collect();
            assert_eq!(hosts, expected);
            let agents = mpi::agents().unwrap();
            let agent_hosts: BTreeSet<String> = agents.iter().map(|a| a.host.clone()).collect();
            assert_eq!(agent_hosts, expected);
            println!("INNER-DONE hosts {hosts:?}");
        }
        return;
    }
    // Namespaces and bridges need root.
    if effective_uid() != 0 {
        eprintln!("skipped: the multi-host test needs root (network namespaces)");
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipped: the multi-host test needs iproute2 (`ip`)");
        return;
    }
    let _one = JOBS.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    let prefix = format!("mp{}", pid % 100_000);
    let net = 20 + pid % 200;
    let hosts = Hosts {
        prefix: prefix.clone(),
    };
    let up = Command::new("bash")
        .arg(script("netns-hosts.sh"))
        .args(["up", &prefix, &net.to_string(), "3"])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&up.stderr);
    if !up.status.success() && why.contains("Operation not permitted") {
        eprintln!("skipped: this sandbox does not allow network namespaces: {why}");
        return;
    }
    assert!(up.status.success(), "{why}");
    let subnet = format!("10.251.{net}.0/24");
    let ip = |i: u32| format!("10.251.{net}.{}", 10 + i);
    let names: Vec<String> = (1..=3).map(|i| format!("{prefix}{i}")).collect();
    let exe = std::env::current_exe().unwrap();
    let o = mpirun_cmd()
        .env("MP_NETNS_PREFIX", &prefix)
        .env("MP_EXPECTED_HOSTS", names.join(","))
        .args(["--mca", "plm_rsh_agent"])
        .arg(script("netns-rsh.sh"))
        .args(["--mca", "plm_rsh_no_tree_spawn", "1"])
        .args(["--mca", "oob_tcp_if_include", &subnet])
        .args(["--mca", "btl_tcp_if_include", &subnet])
        .args(["--mca", "btl", "self,tcp"])
        .args(["--host", &format!("{}:2,{}:1,{}:1", ip(1), ip(2), ip(3))])
        .args(["-n", "4", "-x", INNER, "-x", "MP_EXPECTED_HOSTS"])
        .args(test_args(&exe, "results_come_from_three_hosts"))
        .output()
        .unwrap();
    drop(hosts);
    assert_job_passed(&o, "INNER-DONE hosts");
}

fn effective_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_main_that_never_uses_a_pool_ends_the_job_cleanly() {
    if !inner() {
        let o = job("a_main_that_never_uses_a_pool_ends_the_job_cleanly");
        return assert_job_passed(&o, "INNER-DONE idle");
    }
    // The agents were waiting for work; the exit handler lets them go.
    assert!(mpi::is_launched());
    println!("INNER-DONE idle");
}

#[test]
fn slurm_variables_alone_are_not_a_launch() {
    let test = "slurm_variables_alone_are_not_a_launch";
    if !inner() {
        let exe = std::env::current_exe().unwrap();
        let o = Command::new(exe)
            .args(["--exact", test, "--nocapture"])
            .env(INNER, "1")
            .env("SLURM_JOB_ID", "4242")
            .env("SLURM_PROCID", "0")
            .env("SLURM_NTASKS", "3")
            .output()
            .unwrap();
        return assert_job_passed(&o, "INNER-DONE slurm");
    }
    assert!(!mpi::is_launched());
    let pool = Pool::new(1).unwrap();
    assert_eq!(pool.apply(square, 9).unwrap(), 81);
    println!("INNER-DONE slurm");
}
