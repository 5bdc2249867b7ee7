"""CPython side of the synchronization benchmark: one JSON line per measurement."""
import json
import multiprocessing as mp
import sys
import time


def lock_loop(n):
    lock = mp.Lock()
    acquire, release = lock.acquire, lock.release
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            acquire()
            release()
        best = min(best, time.perf_counter() - t)
    return best / n * 1e9


def semaphore_loop(n):
    sem = mp.Semaphore(4)
    acquire, release = sem.acquire, sem.release
    t = time.perf_counter()
    for _ in range(n):
        acquire()
        release()
    return (time.perf_counter() - t) / n * 1e9


def add(v, n):
    lock = v.get_lock()
    for _ in range(n):
        with lock:
            v.value += 1


def value_two_procs(n):
    v = mp.Value("q", 0)
    ps = [mp.Process(target=add, args=(v, n)) for _ in range(2)]
    t = time.perf_counter()
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    elapsed = time.perf_counter() - t
    assert v.value == 2 * n, v.value
    return elapsed


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    mp.set_start_method("fork")
    print(json.dumps({"name": "lock", "ns": lock_loop(n)}), flush=True)
    print(json.dumps({"name": "semaphore", "ns": semaphore_loop(n)}), flush=True)
    print(json.dumps({"name": "value_2proc", "seconds": value_two_procs(n)}), flush=True)
