"""CPython side of the process start+join benchmark: one JSON line per start method."""
import json
import multiprocessing as mp
import sys
import time


def empty():
    pass


def measure(method, n):
    ctx = mp.get_context(method)
    # Warm up (starts the forkserver, imports in the children's parent).
    for _ in range(3):
        p = ctx.Process(target=empty)
        p.start()
        p.join()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        p = ctx.Process(target=empty)
        p.start()
        p.join()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"method": method, "mean_us": sum(times) / n * 1e6, "median_us": times[n // 2] * 1e6, "n": n}


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    for method in ("fork", "forkserver", "spawn"):
        print(json.dumps(measure(method, n if method != "spawn" else max(10, n // 4))), flush=True)
