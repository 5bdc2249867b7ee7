#!/usr/bin/env python3
"""Side-by-side: multiprocess's pipe() vs a bare socketpair (Rust, libc) vs CPython's
multiprocessing.Pipe, measured in one run on this machine.

    python3 bench/connection_compare.py

Runs `cargo bench --manifest-path bench/Cargo.toml --bench connection_compare` (release build) for the Rust numbers, then
measures CPython the same way: a child process echoes 16-byte messages (ping-pong) and
acknowledges bulk messages of 1 MiB and 64 MiB with one byte (bandwidth).
"""
import multiprocessing as mp
import os
import subprocess
import sys
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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        ["cargo", "bench", "--manifest-path", "bench/Cargo.toml", "--bench", "connection_compare"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    r = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            _, k, v = line.split()
            r[k] = float(v)
    py = cpython()
    print(f"{'':28}{'multiprocess':>14}{'bare socketpair':>17}{'CPython Pipe':>14}"
          f"{'vs bare':>10}{'vs CPython':>12}")
    ours, bare, cp = r["rust_pipe_pingpong_us"], r["bare_socketpair_pingpong_us"], py["pingpong_us"]
    print(f"{'ping-pong 16 B (us/round)':28}{ours:14.2f}{bare:17.2f}{cp:14.2f}"
          f"{ours / bare:9.2f}x{cp / ours:11.2f}x")
    for variant, label in (("rust_pipe", "recv_bytes"), ("rust_pipe_into", "recv_bytes_into")):
        for s in (1, 64):
            k = f"bw_{s}MiB_MBps"
            ours, bare, cp = r[f"{variant}_{k}"], r[f"bare_socketpair_{k}"], py[k]
            print(f"{f'{s} MiB {label} (MB/s)':28}{ours:14.0f}{bare:17.0f}{cp:14.0f}"
                  f"{ours / bare * 100:9.0f}%{ours / cp:11.2f}x")
    print("\nping-pong 'vs bare' is our time / bare time (target <= 1.2x); 'vs CPython' is"
          " how many times faster we are.\nbandwidth 'vs bare' is our share of bare throughput"
          " (target >= 80%); 'vs CPython' is our MB/s / CPython's (target >= 2x).")


if __name__ == "__main__":
    main()
