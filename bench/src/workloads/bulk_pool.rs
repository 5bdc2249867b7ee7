//! Bulk data through a `Pool(2)`: a round trip of forty 4 MiB `Vec<u8>` items through an
//! identity function (and of the same as `serde_bytes::ByteBuf`), and two CPU-bound filters (3x3 blurs of forty 2048x2048 grayscale
//! images, 4 MiB each: one written plainly, one the compiler vectorises) against the same
//! filter on one thread in this process. CPython does
//! the same with `bytes` (`py/bulk_pool.py`; its blur in pure Python would measure the
//! interpreter, so it is left out: the pool rows there are the round trip only).
//!
//! Items are passed by reference (`pool.map(f, images.iter())`): nothing is cloned first.
//! Rows give milliseconds per batch of forty and, in the name, GB/s of input.

use crate::{python_json, Row};
use multiprocess::Pool;
use serde_bytes::ByteBuf;
use std::hint::black_box;
use std::time::Instant;

const SIDE: usize = 2048;
const SIZE: usize = SIDE * SIDE;
const ITEMS: usize = 40;
const TRIALS: usize = 3;

fn same(v: Vec<u8>) -> Vec<u8> {
    v
}

fn same_buf(v: ByteBuf) -> ByteBuf {
    v
}

/// A 3x3 box blur of a `SIDE`x`SIDE` grayscale image; the border is copied.
pub fn blur(img: Vec<u8>) -> Vec<u8> {
    let mut out = img.clone();
    for y in 1..SIDE - 1 {
        let (up, row, down) = (
            &img[(y - 1) * SIDE..y * SIDE],
            &img[y * SIDE..(y + 1) * SIDE],
            &img[(y + 1) * SIDE..(y + 2) * SIDE],
        );
        let o = &mut out[y * SIDE..(y + 1) * SIDE];
        for x in 1..SIDE - 1 {
            let s: u32 = [up, row, down]
                .iter()
                .map(|r| r[x - 1] as u32 + r[x] as u32 + r[x + 1] as u32)
                .sum();
            o[x] = (s / 9) as u8;
        }
    }
    out
}

/// A 3x3 Gaussian blur computed pixel by pixel in `f32`, edges clamped: the filter as a
/// user first writes it (about 20x slower than [`blur`], which the compiler vectorises).
pub fn blur_naive(img: Vec<u8>) -> Vec<u8> {
    const K: [[f32; 3]; 3] = [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]];
    let mut out = vec![0u8; img.len()];
    for y in 0..SIDE {
        for x in 0..SIDE {
            let mut acc = 0.0f32;
            for (dy, krow) in K.iter().enumerate() {
                for (dx, k) in krow.iter().enumerate() {
                    let yy = (y + dy).saturating_sub(1).min(SIDE - 1);
                    let xx = (x + dx).saturating_sub(1).min(SIDE - 1);
                    acc += k * img[yy * SIDE + xx] as f32;
                }
            }
            out[y * SIDE + x] = (acc / 16.0).round() as u8;
        }
    }
    out
}

fn images() -> Vec<Vec<u8>> {
    (0..ITEMS)
        .map(|i| (0..SIZE).map(|k| (k * 7 + i) as u8).collect())
        .collect()
}

fn best_ms(mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    (0..TRIALS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn row(name: &str, ms: f64, peer: Option<f64>) -> Row {
    Row {
        name: format!(
            "{name} ({:.2} GB/s)",
            (ITEMS * SIZE) as f64 / (ms * 1e-3) / 1e9
        ),
        unit: "ms",
        ours: ms,
        python: peer,
        baseline: None,
    }
}

pub fn rows(_iters: usize) -> Vec<Row> {
    let py = python_json("bulk_pool.py", &[ITEMS.to_string(), SIZE.to_string()]);
    let py_ms = py
        .iter()
        .find(|v| v["name"] == "roundtrip")
        .and_then(|v| v["ms"].as_f64());
    let imgs = images();
    let pool = Pool::new(2).unwrap();
    let trip = best_ms(|| {
        let out = pool.map(same, imgs.iter()).unwrap();
        assert_eq!(out.len(), ITEMS);
        black_box(out);
    });
    // The same through `serde_bytes::ByteBuf`, the codec's bulk path from the start.
    let bufs: Vec<ByteBuf> = imgs.iter().cloned().map(ByteBuf::from).collect();
    let trip_buf = best_ms(|| {
        let out = pool.map(same_buf, bufs.iter()).unwrap();
        assert_eq!(out.len(), ITEMS);
        black_box(out);
    });
    drop(bufs);
    let mut rows = vec![
        row(
            "pool(2) map identity, 40 x 4 MiB Vec<u8> (vs CPython bytes)",
            trip,
            py_ms,
        ),
        row(
            "pool(2) map identity, 40 x 4 MiB ByteBuf (vs CPython bytes)",
            trip_buf,
            py_ms,
        ),
    ];
    // A macro, not a loop over fn pointers: a pool's target must be a fn item.
    macro_rules! filter_rows {
        ($name:expr, $filter:expr) => {{
            // One thread gets each image by clone, as a worker gets its own copy.
            let one = best_ms(|| {
                black_box(imgs.iter().map(|i| $filter(i.clone())).collect::<Vec<_>>());
            });
            let two = best_ms(|| {
                black_box(pool.map($filter, imgs.iter()).unwrap());
            });
            // The ceiling for any pool of two at that moment: two threads of this process,
            // twenty images each (on a loaded machine, far from 2x).
            let threads = best_ms(|| {
                std::thread::scope(|s| {
                    for half in imgs.chunks(ITEMS / 2) {
                        s.spawn(move || {
                            black_box(half.iter().map(|i| $filter(i.clone())).collect::<Vec<_>>())
                        });
                    }
                });
            });
            rows.push(row(
                &format!("one thread: {}, 40 x 4 MiB images", $name),
                one,
                None,
            ));
            rows.push(row(
                &format!("two threads: {} ({:.2}x one thread)", $name, one / threads),
                threads,
                None,
            ));
            rows.push(row(
                &format!(
                    "pool(2) map {}, 40 x 4 MiB ({:.2}x one thread)",
                    $name,
                    one / two
                ),
                two,
                None,
            ));
        }};
    }
    filter_rows!("3x3 Gaussian f32 blur", blur_naive);
    filter_rows!("3x3 box blur, vectorised", blur);
    rows
}
