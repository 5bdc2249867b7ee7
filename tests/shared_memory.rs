//! Named shared memory: attach from children and from CPython, the ownership rule (an
//! attacher never removes, a dead creator always does), and bad input.

mod common;

use common::{joined, wait_until, Reaper, LONG};

use multiprocess::{
    get_context, pipe, Connection, Error, Lock, Queue, SharedMemory, StartMethod, Value,
};
use std::path::Path;

fn on_disk(name: &str) -> bool {
    Path::new("/dev/shm").join(name).exists()
}

each_method!(
    attach_by_name_from_child,
    handle_in_args,
    tree_killed_leaves_nothing,
    child_made_segment_outlives_the_child,
    a_peer_cannot_shrink_shared_state,
);

fn check_and_answer(name: String) {
    let mut shm = SharedMemory::attach(&name).unwrap();
    assert_eq!(&shm.as_slice()[..5], b"hello");
    shm.as_mut_slice()[5..10].copy_from_slice(b"world");
}

fn attach_by_name_from_child(m: StartMethod) {
    let mut shm = SharedMemory::create(None, 10_000).unwrap();
    assert_eq!(shm.size(), 10_000);
    assert!(on_disk(shm.name()));
    shm.as_mut_slice()[..5].copy_from_slice(b"hello");
    let p = Reaper(get_context(m).process(check_and_answer, shm.name().to_string()));
    p.0.start().unwrap();
    assert_eq!(joined(&p.0), 0);
    assert_eq!(&shm.as_slice()[..10], b"helloworld");
    // gh-82300: a process that attached and ended removes nothing.
    assert!(on_disk(shm.name()), "an attacher's exit must not unlink");
    let again = SharedMemory::attach(shm.name()).unwrap();
    assert_eq!(&again.as_slice()[..10], b"helloworld");
    shm.unlink().unwrap();
    assert!(!on_disk(shm.name()));
    // Mappings outlive the name.
    assert_eq!(&again.as_slice()[..10], b"helloworld");
    assert!(matches!(shm.unlink(), Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound));
}

fn bump_first(shm: SharedMemory) -> String {
    let mut shm = shm;
    shm.as_mut_slice()[0] += 1;
    shm.name().to_string()
}

fn handle_in_args(m: StartMethod) {
    let shm = SharedMemory::create(None, 1).unwrap();
    let name = get_context(m)
        .spawn(bump_first, shm)
        .unwrap()
        .join()
        .unwrap();
    let shm = SharedMemory::attach(&name).unwrap();
    assert_eq!(shm.as_slice(), [1]);
    shm.unlink().unwrap();
}

/// Creates a segment, reports its name, then blocks until killed.
fn create_and_hang(c: Connection) {
    let shm = SharedMemory::create(None, 4096).unwrap();
    c.send(&shm.name()).unwrap();
    let _: u8 = c.recv().unwrap_or(0);
}

const TREE_ENV: &str = "MULTIPROCESS_TEST_SHM_TREE";

/// Not a test of its own: the main program of a separate process tree that
/// `tree_killed_leaves_nothing` starts (this test binary again) and kills.
#[test]
#[ignore = "a helper: run by tree_killed_leaves_nothing as a program of its own"]
fn helper_tree_main() {
    let Ok(method) = std::env::var(TREE_ENV) else {
        return;
    };
    let ctx = get_context(method.parse().unwrap());
    let own = SharedMemory::create(None, 4096).unwrap();
    let kept = SharedMemory::create(None, 4096).unwrap();
    kept.persist().unwrap();
    // A child that creates a segment and exits: the tree keeps it.
    let from_child = ctx
        .spawn(
            |()| SharedMemory::create(None, 64).unwrap().name().to_string(),
            (),
        )
        .unwrap()
        .join()
        .unwrap();
    // A child that creates one and is still running when the tree is killed.
    let (ours, theirs) = pipe().unwrap();
    ctx.process(create_and_hang, theirs).start().unwrap();
    let hanging: String = ours.recv().unwrap();
    println!(
        "NAMES {} {} {} {}",
        own.name(),
        from_child,
        hanging,
        kept.name()
    );
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    // Block until killed (our parent never writes).
    let _ = std::io::stdin().read_line(&mut String::new());
}

fn tree_killed_leaves_nothing(m: StartMethod) {
    use std::io::BufRead;
    let mut main = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["helper_tree_main", "--exact", "--ignored", "--nocapture"])
        .env(TREE_ENV, m.name())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut names = String::new();
    for line in std::io::BufReader::new(main.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("NAMES ") {
            names = rest.to_string();
            break;
        }
    }
    let names: Vec<&str> = names.split(' ').collect();
    assert_eq!(names.len(), 4, "the helper reports its segments: {names:?}");
    let (owned, kept) = (&names[..3], names[3]);
    assert!(names.iter().all(|n| on_disk(n)));
    main.kill().unwrap(); // SIGKILL to the tree's main program
    main.wait().unwrap();
    for name in owned {
        assert!(
            wait_until(LONG, || !on_disk(name)),
            "segment {name} of a SIGKILLed tree must be removed"
        );
    }
    assert!(on_disk(kept), "a persisted segment outlives its tree");
    SharedMemory::attach(kept).unwrap().unlink().unwrap();
}

fn create_and_return(persist: bool) -> String {
    let shm = SharedMemory::create(None, 64).unwrap();
    if persist {
        shm.persist().unwrap();
    }
    shm.name().to_string()
}

fn child_made_segment_outlives_the_child(m: StartMethod) {
    let ctx = get_context(m);
    let made = ctx.spawn(create_and_return, false).unwrap().join().unwrap();
    // The child is gone; its segment belongs to our tree and is still there.
    let shm = SharedMemory::attach(&made).unwrap();
    assert_eq!(shm.size(), 64);
    shm.unlink().unwrap();
    // A persisted one can be adopted into our care.
    let kept = ctx.spawn(create_and_return, true).unwrap().join().unwrap();
    let adopted = SharedMemory::adopt(&kept).unwrap();
    adopted.unlink().unwrap();
    assert!(!on_disk(&kept));
}

#[test]
fn bad_input_is_a_clear_error() {
    let missing = SharedMemory::attach("multiprocess-test-no-such-segment");
    assert!(
        matches!(&missing, Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound),
        "{missing:?}"
    );
    assert!(matches!(
        SharedMemory::create(None, 0),
        Err(Error::InvalidArgument(_))
    ));
    for bad in ["", "/", "a/b", "..", "x\0y", &"n".repeat(300)] {
        assert!(
            matches!(
                SharedMemory::create(Some(bad), 8),
                Err(Error::InvalidArgument(_))
            ),
            "{bad:?}"
        );
        assert!(matches!(
            SharedMemory::attach(bad),
            Err(Error::InvalidArgument(_))
        ));
    }
    let name = format!("mp-test-{}", std::process::id());
    let a = SharedMemory::create(Some(&format!("/{name}")), 16).unwrap();
    assert_eq!(a.name(), name, "the leading slash is optional");
    let dup = SharedMemory::create(Some(&name), 16);
    assert!(
        matches!(&dup, Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::AlreadyExists),
        "{dup:?}"
    );
    // Too small for what it should hold.
    let small = SharedMemory::create(None, 12).unwrap();
    assert_eq!(small.as_slice_of::<u32>(3).unwrap().len(), 3);
    let r = small.as_slice_of::<u64>(2);
    assert!(
        matches!(&r, Err(Error::InvalidArgument(m)) if m.contains("too small")),
        "{r:?}"
    );
    a.unlink().unwrap();
    // An empty segment (made by someone else) cannot be mapped.
    let empty = format!("mp-test-empty-{}", std::process::id());
    std::fs::File::create(Path::new("/dev/shm").join(&empty)).unwrap();
    let r = SharedMemory::attach(&empty);
    std::fs::remove_file(Path::new("/dev/shm").join(&empty)).unwrap();
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}

#[test]
fn cpython_attaches_by_name_and_back() {
    let mut shm = SharedMemory::create(None, 4096).unwrap();
    shm.as_mut_slice()[..5].copy_from_slice(b"hello");
    // CPython 3.11 registers attached segments with its resource tracker, which would
    // unlink ours at exit (gh-82300): unregister, as its users have to.
    let script = r#"
import sys
from multiprocessing import shared_memory, resource_tracker
s = shared_memory.SharedMemory(name=sys.argv[1])
resource_tracker.unregister(s._name, "shared_memory")
print(bytes(s.buf[:5]).decode())
s.buf[5:10] = b"world"
s.close()
mine = shared_memory.SharedMemory(create=True, size=32)
mine.buf[:3] = b"py!"
resource_tracker.unregister(mine._name, "shared_memory")
print(mine.name)
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, shm.name()])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("hello"));
    assert_eq!(&shm.as_slice()[..10], b"helloworld");
    let theirs = SharedMemory::attach(lines.next().unwrap()).unwrap();
    assert_eq!(&theirs.as_slice()[..3], b"py!");
    theirs.unlink().unwrap();
    shm.unlink().unwrap();
}

/// In a peer that holds the handles: tries to shrink every shared segment behind them
/// (found as this process's open memfds) to nothing. Returns (tried, refused).
fn shrink_everything((v, q, l): (Value<u64>, Queue<u32>, Lock)) -> (usize, usize) {
    let (mut tried, mut refused) = (0, 0);
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:multiprocess-") {
            continue;
        }
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(entry.path()) else {
            continue;
        };
        tried += 1;
        if let Err(e) = f.set_len(0) {
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
            refused += 1;
        }
    }
    drop((v, q, l));
    (tried, refused)
}

/// A peer that holds a `Value`, a `Queue` and a `Lock` cannot `ftruncate` their shared
/// memory to shrink it (the segments are sealed), so the owner's next access cannot die
/// of `SIGBUS`; everything still works afterwards.
fn a_peer_cannot_shrink_shared_state(m: StartMethod) {
    let v = Value::new(41u64).unwrap();
    let q = Queue::new().unwrap();
    let l = Lock::new().unwrap();
    let (tried, refused) = get_context(m)
        .spawn(shrink_everything, (v.clone(), q.clone(), l.clone()))
        .unwrap()
        .join()
        .unwrap();
    assert!(tried >= 3, "the peer found the three segments ({tried})");
    assert_eq!(refused, tried, "every shrink was refused");
    *v.lock() += 1;
    assert_eq!(v.get(), 42);
    q.put(7).unwrap();
    assert_eq!(q.get_timeout(LONG).unwrap(), 7);
    drop(l.acquire());
}
