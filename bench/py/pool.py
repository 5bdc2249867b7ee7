"""CPython side of the pool benchmarks: one JSON line per workload.

Usage: pool.py METHOD WORKERS MAP_ITEMS IMAP_ITEMS APPLY_CALLS. METHOD is the start
method: `fork` is CPython's fastest Pool (and 3.11's default on Linux), `forkserver`
3.14's default.
"""
import json
import multiprocessing as mp
import sys
import time


def sq(x):
    return x * x


def best_of(n, f):
    best = None
    for _ in range(n):
        t = time.perf_counter()
        f()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best


if __name__ == "__main__":
    method = sys.argv[1] if len(sys.argv) > 1 else "fork"
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    items = int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000
    imap_items = int(sys.argv[4]) if len(sys.argv) > 4 else 100_000
    calls = int(sys.argv[5]) if len(sys.argv) > 5 else 1000
    with mp.get_context(method).Pool(workers) as pool:
        pool.map(sq, range(1000))

        def imap():
            for _ in pool.imap(sq, range(imap_items)):  # chunksize 1, Python's default
                pass

        s = best_of(3, imap)
        print(json.dumps({"name": "imap", "us_per_item": s / imap_items * 1e6}), flush=True)
        s = best_of(3, lambda: pool.map(sq, range(items)))
        print(json.dumps({"name": "map", "seconds": s, "items": items}), flush=True)
        for i in range(500):  # warm-up, as on the Rust side
            pool.apply_async(sq, (i,)).get()

        def apply():
            for i in range(calls):
                pool.apply_async(sq, (i,)).get()

        # Best of three batches (a shared virtual machine has slow spells), as in Rust.
        s = best_of(3, apply)
        print(json.dumps({"name": "apply_async", "mean_us": s / calls * 1e6}), flush=True)
