#!/usr/bin/env bash
# The one command that runs the daemon, on a fresh Debian machine:
#   scripts/run.sh [--config FILE]
# Installs what is missing (scripts/setup.sh), builds a release binary and
# runs `convstore serve`. With no configuration, PostgreSQL is managed by
# convstore under the state directory (no set-up); see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked
exec target/release/convstore serve "$@"
