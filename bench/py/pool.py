"""CPython side of the pool benchmarks: one JSON line per workload."""
import json
import multiprocessing as mp
import sys
import time


def sq(x):
    return x * x


if __name__ == "__main__":
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    items = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    with mp.get_context("forkserver").Pool(workers) as pool:
        pool.map(sq, range(1000))
        best = None
        for _ in range(3):
            t = time.perf_counter()
            pool.map(sq, range(items))
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        print(json.dumps({"name": "map", "seconds": best, "items": items}), flush=True)
        for i in range(500):  # warm-up, as on the Rust side
            pool.apply_async(sq, (i,)).get()
        n = 1000
        best = None
        for _ in range(3):  # best of three batches, as on the Rust side
            t = time.perf_counter()
            for i in range(n):
                pool.apply_async(sq, (i,)).get()
            dt = (time.perf_counter() - t) / n * 1e6
            best = dt if best is None else min(best, dt)
        print(json.dumps({"name": "apply_async", "mean_us": best}), flush=True)
