"""CPython side of the bulk pool benchmark: a Pool(2) (start method fork) round trip of
ITEMS `bytes` of SIZE bytes through an identity function.

Prints one JSON line: {"name": "roundtrip", "ms"}: the best of three batches, after a
warm-up batch, as on the Rust side.
"""
import json
import multiprocessing as mp
import sys
import time


def same(b):
    return b


if __name__ == "__main__":
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 4 << 20
    data = [bytes([i % 256]) * size for i in range(items)]
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(same, data)
        best = None
        for _ in range(3):
            t = time.perf_counter()
            out = pool.map(same, data)
            dt = time.perf_counter() - t
            assert len(out) == items
            best = dt if best is None else min(best, dt)
    print(json.dumps({"name": "roundtrip", "ms": best * 1e3}), flush=True)
