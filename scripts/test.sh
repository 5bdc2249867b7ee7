#!/usr/bin/env bash
# The project's test command (README: "Tests"). Formatting, lints, docs, then every test:
# unit, integration (real processes, real signals, CPython as a peer), doctests, and the
# examples (tests/examples.rs runs each one and checks what it prints).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
# MSRV: only the stable and nightly toolchains are installed here (no other can be
# downloaded), so the declared `rust-version` is checked by clippy's `incompatible_msrv`
# lint, which reads it from Cargo.toml and flags any std API newer than it. It is 1.85
# because a dependency (indicatif 0.18) needs that.
echo "== MSRV (clippy::incompatible_msrv against rust-version)"
cargo clippy --all-targets -- -D warnings -D clippy::incompatible_msrv
echo "== bench/ (lints as errors) and fuzz/ build"
cargo clippy --manifest-path bench/Cargo.toml --all-targets -- -D warnings
# cargo-fuzz's sanitizer flags need nightly; a plain check proves the targets compile.
cargo +nightly check --manifest-path fuzz/Cargo.toml
echo "== cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
echo "== cargo test"
cargo test
echo "== cargo test --features mpi --test mpi (Pool on MPI: jobs under mpirun -n 3)"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo clippy --features mpi --all-targets -- -D warnings
cargo test --features mpi --test mpi
