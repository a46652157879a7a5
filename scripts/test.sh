#!/usr/bin/env bash
# The one command that runs every test, on a fresh Debian machine:
#   scripts/test.sh
# Installs what is missing (scripts/setup.sh), then formats-checks, lints and
# runs the whole suite against real PostgreSQL/pgvector (managed clusters in
# temp directories) and real sockets.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo test"
# Integration tests start a daemon, a stand-in and a PostgreSQL cluster each;
# two at a time keeps a 2-core machine responsive.
cargo test --locked --all-targets -- --test-threads="${CONVSTORE_TEST_THREADS:-2}"
