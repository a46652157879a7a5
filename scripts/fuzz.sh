#!/usr/bin/env bash
# Runs the cargo-fuzz target for request parsing and validation
# (fuzz/fuzz_targets/parse_validate.rs) for a bounded time:
#
#   scripts/fuzz.sh [SECONDS]        default 60; CI runs it from scripts/test.sh
#
# Toolchain: cargo-fuzz wants nightly (for -Zsanitizer). With a nightly
# toolchain installed it runs with AddressSanitizer; without one (CI has
# only stable, and no way to download another), the same target is built by
# stable rustc with RUSTC_BOOTSTRAP=1 and no sanitizer: libFuzzer's
# coverage-guided search and every assertion of the harness still run,
# only memory errors in unsafe code would go unseen (convstore's parsing
# has none). The script says which it used.
#
# The corpus grows in fuzz/corpus/parse_validate (seeded from
# fuzz/seeds/parse_validate); a crash leaves its input in
# fuzz/artifacts/parse_validate and fails the script. Replay one with
#   cargo fuzz run parse_validate fuzz/artifacts/parse_validate/<file>
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
die() { printf 'fuzz: error: %s\n' "$*" >&2; exit 1; }

command -v cargo-fuzz >/dev/null ||
    die "cargo-fuzz is not installed: CI=true scripts/setup.sh --tests installs it, or: cargo install cargo-fuzz --locked --version 0.13.2"
command -v c++ >/dev/null || die "no C++ compiler (libFuzzer is C++): apt-get install g++"

toolchain=()
sanitizer=none
# CONVSTORE_FUZZ_TOOLCHAIN=stable forces the stable path (to check it).
if [ "${CONVSTORE_FUZZ_TOOLCHAIN:-}" != stable ] &&
    rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
    sanitizer=address
    echo "fuzz: nightly toolchain, AddressSanitizer, ${secs}s"
else
    export RUSTC_BOOTSTRAP=1
    echo "fuzz: stable toolchain with RUSTC_BOOTSTRAP=1 (no nightly installed), no sanitizer, ${secs}s"
fi

corpus=fuzz/corpus/parse_validate
mkdir -p "$corpus"
cp -n fuzz/seeds/parse_validate/* "$corpus"/

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo "${toolchain[@]}" fuzz run --sanitizer "$sanitizer" parse_validate "$corpus" -- \
    -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1)
cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    die "the fuzz target failed (exit $status); the input is in fuzz/artifacts/parse_validate"
fi
echo "fuzz: ${runs:-?} inputs in ${secs}s, ${cov:-cov ?}, corpus $(find "$corpus" -type f | wc -l) files, no crash"
