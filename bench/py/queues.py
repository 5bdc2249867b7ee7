"""CPython side of the queue benchmark: one producer process, the parent consumes.

Prints one JSON line per case: {"case", "kind", "n", "ns_per_item"}; the time runs from the
first item received to the last (process start excluded), as on the Rust side.
"""
import json
import sys
import multiprocessing as mp
import time


def produce(q, n, size):
    item = 7 if size == 0 else b"\x01" * size
    for i in range(n):
        q.put(i if size == 0 else item)


def measure(kind, n, size):
    ctx = mp.get_context("fork")
    q = getattr(ctx, kind)()
    p = ctx.Process(target=produce, args=(q, n, size))
    p.start()
    q.get()
    t = time.perf_counter()
    for _ in range(n - 1):
        q.get()
    dt = time.perf_counter() - t
    p.join()
    return dt / (n - 1) * 1e9


if __name__ == "__main__":
    small_n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    big_n = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    # Best of two trials (other load on the machine only ever slows a trial down).
    for kind in ("Queue", "SimpleQueue"):
        ns = min(measure(kind, small_n, 0) for _ in range(2))
        print(json.dumps({"case": "i64", "kind": kind, "n": small_n, "ns_per_item": ns}),
              flush=True)
    ns = min(measure("Queue", big_n, 1 << 20) for _ in range(3))
    print(json.dumps({"case": "1MiB", "kind": "Queue", "n": big_n, "ns_per_item": ns}),
          flush=True)
