#!/usr/bin/env bash
# The one command that runs every test, on a fresh Debian machine:
#   scripts/test.sh
# Installs what is missing (scripts/setup.sh), then formats-checks, lints and
# runs the whole suite against real PostgreSQL/pgvector (managed clusters in
# temp directories) and real sockets.
set -euo pipefail
cd "$(dirname "$0")/.."

# --tests: also the test tools (promtool, chromium, systemd-analyze,
# cargo-deny, cargo-deb for the package check at the end; under CI the
# fuzz tools).
scripts/setup.sh --tests

# A CI build happens once: incremental compilation's caches would only take
# disk (gigabytes for this workspace) and time.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo clippy: the daemon without the builtin model (--no-default-features)"
cargo clippy -p convstore --no-default-features --all-targets --locked -- -D warnings

echo "== cargo deny: licenses, sources, bans (deny.toml)"
# Advisories need the RustSec database from a git host CI cannot reach.
cargo deny check bans licenses sources

echo "== cargo test"
# Integration tests start a daemon, a stand-in and a PostgreSQL cluster each;
# two at a time keeps a 2-core machine responsive. Set through the
# environment, not `-- --test-threads`: the criterion benches (run once each
# as tests) refuse libtest's flags.
RUST_TEST_THREADS="${CONVSTORE_TEST_THREADS:-2}" cargo test --workspace --locked --all-targets

echo "== python client (pytest)"
# clients/python against real daemons: the convstore binary `cargo test`
# just built (target/debug/convstore) and the embedding stand-in, which no
# Rust test builds as a binary (about a minute, once), each with a managed
# PostgreSQL in a temp directory. mypy --strict on the package first
# (seconds). The venv is setup.sh's (--tests).
cargo build --locked -p convstore-standin
PY_VENV="${CONVSTORE_PY_VENV:-$PWD/target/py-venv}"
(cd clients/python && "$PY_VENV/bin/mypy" && "$PY_VENV/bin/pytest" -q -p no:cacheprovider)

echo "== cargo test: storage and search on hash-partitioned tables (database.partitions = 8)"
# The same storage, search, lifecycle and retention tests with
# conversations and conversation_chunks PARTITION BY HASH (user_id), the
# key rules Citus enforces (docs/STORAGE.md); about two minutes.
CONVSTORE_TEST_PARTITIONS=8 RUST_TEST_THREADS="${CONVSTORE_TEST_THREADS:-2}" \
    cargo test --locked -p convstore --test store_write --test search --test lifecycle --test retention

echo "== debian package"
# Packages the binary the tests just built (target/debug/convstore) and
# checks its contents. --no-build: a plain `cargo build` here would compile
# the daemon and several dependencies again, as without the dev-dependencies
# their features differ (minutes on a fresh machine).
scripts/deb.sh --no-build

echo "== fuzz: request parsing and validation (bounded)"
# cargo-fuzz is installed by setup.sh under CI; elsewhere only if present.
if [ "${CI:-}" = true ] || command -v cargo-fuzz >/dev/null; then
    scripts/fuzz.sh "${CONVSTORE_FUZZ_SECONDS:-60}"
else
    echo "skipped: cargo-fuzz is not installed (CI=true scripts/setup.sh --tests installs it)"
fi
