"""CPython side of the manager benchmarks: one JSON line per workload.

argv: iters [path key]  -- with a socket path, also time a CPython client against the
Rust server listening there with that key.
"""
import json
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing.managers import SyncManager


def setget_us(d, iters):
    d["k"] = 0
    t = []
    for i in range(iters):
        s = time.perf_counter()
        d["k"] = i
        assert d["k"] == i
        t.append((time.perf_counter() - s) * 1e6)
    return statistics.median(t)


if __name__ == "__main__":
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with mp.Manager() as m:
        d = m.dict()
        setget_us(d, 200)
        print(json.dumps({"name": "dict_setget", "median_us": setget_us(d, iters)}), flush=True)
    starts = []
    for _ in range(max(5, iters // 100)):
        s = time.perf_counter()
        m = mp.Manager()
        m.shutdown()
        starts.append((time.perf_counter() - s) * 1e3)
    print(json.dumps({"name": "start_shutdown", "median_ms": statistics.median(starts)}), flush=True)
    if len(sys.argv) > 3:
        m = SyncManager(address=sys.argv[2], authkey=sys.argv[3].encode())
        m.connect()
        d = m.dict()
        setget_us(d, 200)
        print(json.dumps({"name": "dict_setget_rust_server", "median_us": setget_us(d, iters)}), flush=True)
