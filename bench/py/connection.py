#!/usr/bin/env python3
"""CPython's multiprocessing.Pipe for the `connection` workload of the side-by-side
harness (bench/src/workloads/connection.rs): a child process echoes 16-byte messages
(ping-pong) and acknowledges bulk messages of 1 MiB and 64 MiB with one byte (bandwidth).
Prints one JSON line.
"""
import json
import multiprocessing as mp
import time

SMALL = 16
ROUNDS = 5_000
TRIALS = 5  # best of: the machine may be shared


def bulk_count(size):
    return max(4, min(256, (256 << 20) // size))


def best(f):
    times = []
    for _ in range(TRIALS):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def serve(conn):
    while True:
        m = conn.recv_bytes()
        if not m:
            break
        conn.send_bytes(m if len(m) <= 64 else b"k")


def cpython():
    a, b = mp.Pipe()
    p = mp.Process(target=serve, args=(b,))
    p.start()
    msg = b"\x07" * SMALL
    for _ in range(1000):
        a.send_bytes(msg)
        a.recv_bytes()
    def pingpong():
        for _ in range(ROUNDS):
            a.send_bytes(msg)
            a.recv_bytes()
    res = {"pingpong_us": best(pingpong) * 1e6 / ROUNDS}
    for size in (1 << 20, 64 << 20):
        data = b"\x5a" * size
        n = bulk_count(size)
        def bulk():
            for _ in range(n):
                a.send_bytes(data)
                a.recv_bytes()
        res[f"bw_{size >> 20}MiB_MBps"] = size * n / best(bulk) / 1e6
    a.send_bytes(b"")
    p.join()
    return res


def main():
    print(json.dumps(cpython()), flush=True)


if __name__ == "__main__":
    main()
