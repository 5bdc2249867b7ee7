"""CPython side of the bulk benchmark: 1 MiB `bytes` items from one producer process to
the parent, through a `Queue` and through a `Pipe`.

Prints one JSON line per kind: {"kind", "n", "ns_per_item"}; the time runs from the first
item received to the last (process start excluded), as on the Rust side.
"""
import json
import sys
import multiprocessing as mp
import time

SIZE = 1 << 20


def produce_queue(q, n):
    item = b"\x01" * SIZE
    for _ in range(n):
        q.put(item)


def produce_pipe(c, n):
    item = b"\x01" * SIZE
    for _ in range(n):
        c.send(item)


def measure(kind, n):
    ctx = mp.get_context("fork")
    if kind == "Queue":
        q = ctx.Queue()
        p = ctx.Process(target=produce_queue, args=(q, n))
        get = q.get
    else:
        a, b = ctx.Pipe()
        p = ctx.Process(target=produce_pipe, args=(b, n))
        get = a.recv
    p.start()
    get()
    t = time.perf_counter()
    for _ in range(n - 1):
        get()
    dt = time.perf_counter() - t
    p.join()
    return dt / (n - 1) * 1e9


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    # Best of three trials (other load on the machine only ever slows a trial down).
    for kind in ("Queue", "Pipe"):
        ns = min(measure(kind, n) for _ in range(3))
        print(json.dumps({"kind": kind, "n": n, "ns_per_item": ns}), flush=True)
