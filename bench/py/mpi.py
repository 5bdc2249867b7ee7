"""CPython side of the MPI pool benchmark: mpi4py.futures' MPIPoolExecutor.map over tiny
tasks. Run under `mpirun -n 3 python3 -m mpi4py.futures mpi.py ITEMS CHUNKSIZE`: rank 0
runs this script, the other ranks are the workers. One JSON line per measurement."""
import json
import sys
import time

from mpi4py.futures import MPIPoolExecutor


def sq(x):
    return x * x


if __name__ == "__main__":
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    chunks = [int(c) for c in sys.argv[2:]] or [1]
    with MPIPoolExecutor() as ex:
        list(ex.map(sq, range(1000)))
        for chunksize in chunks:
            best = None
            for _ in range(3):
                t = time.perf_counter()
                out = list(ex.map(sq, range(items), chunksize=chunksize))
                dt = time.perf_counter() - t
                assert len(out) == items
                best = dt if best is None else min(best, dt)
            print(json.dumps({"name": "map", "chunksize": chunksize, "items": items,
                              "seconds": best}), flush=True)
