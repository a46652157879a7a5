#!/usr/bin/env bash
# Reproduces the measurements in docs/PERFORMANCE.md on this machine, in one
# run:
#   scripts/bench.sh
#
# Builds a release binary, then BENCH_REPEAT times (default 3): starts a
# fresh daemon with the default configuration (managed PostgreSQL in a temp
# directory, HNSW index) but for its one embedding backend: the Ollama
# stand-in at zero latency imitating nomic-embed-text (768 dimensions, 2048
# tokens of context; BENCH_MODEL, BENCH_DIMS, BENCH_CONTEXT), and runs
# `convstore bench` against it:
#
#   sample        the whole shared sample once (4,000 conversations, 16
#                 connections): stored conversations/s and chunks/s, read
#                 from the daemon's own counters;
#   ack-<t>-c<n>  single posts, closed loop, over <t> = unix | http with
#                 <n> = 1 | 16 connections, BENCH_ACK_COUNT requests each
#                 (default 8000: under the default queue capacity of 10,000,
#                 so no request can be refused for a full queue);
#   open-<t>      single posts, open loop at BENCH_OPEN_RATE per second
#                 (default 100, about half what this daemon stores per
#                 second on a 2-core machine) for BENCH_DURATION seconds
#                 (default 20), 16 connections: latency from the scheduled
#                 send time, and received→committed at a sustainable rate.
#
# The ack and open runs use --unique-text: every request brings new text, as
# fresh traffic does, so the storage work behind them is that of new data
# (no cache hits, no duplicate vectors in the index).
#
# Every run writes JSON, Markdown and the printed table under BENCH_OUT
# (default target/bench-results/<UTC time>/), with the load average and the
# busiest processes before each run (the machine may be shared) and the CPU
# time the daemon, its PostgreSQL and the stand-in used during it;
# summary.md holds the medians. The shared sample is used when it is there
# (../shared/data or CONVSTORE_SAMPLE), else generated conversations.
#
# The criterion micro-benchmarks are separate: cargo bench --bench hot_paths.
set -euo pipefail
cd "$(dirname "$0")/.."

REPEAT=${BENCH_REPEAT:-3}
DURATION=${BENCH_DURATION:-20}
ACK_COUNT=${BENCH_ACK_COUNT:-8000}
OPEN_RATE=${BENCH_OPEN_RATE:-100}
# The embedding model the stand-in imitates (Ollama's nomic-embed-text).
MODEL=${BENCH_MODEL:-nomic-embed-text}
DIMS=${BENCH_DIMS:-768}
CONTEXT=${BENCH_CONTEXT:-2048}
OUT=${BENCH_OUT:-target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN="$TARGET_DIR/release/convstore"

log() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

scripts/setup.sh
cargo build --release --locked --bin convstore
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

machine() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "kernel: $(uname -srm)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) online"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "rustc: $(rustc --version)"
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
}
machine >"$OUT/machine.txt"

# The busiest processes over the last second, for the record of what else
# was running.
busy() {
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
    top -b -n 2 -d 1 -w 160 | awk '/^top -/ { n++ } n == 2' | sed -n '7,16p'
}

# CPU seconds used so far by the daemon, its PostgreSQL (postmaster, live
# backends, and backends that exited) and the stand-in, as JSON. CPU time
# does not depend on what else runs on the machine, unlike wall time.
cpu() {
    python3 - "$DAEMON_PID" "$STANDIN_PID" "$WS" <<'EOF'
import json, os, sys

tick = os.sysconf("SC_CLK_TCK")

def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # Fields after "(comm) ": state, ppid, ... utime is field 14.
    return text[text.rindex(")") + 2:].split()

def own(pid):
    s = stat(pid)
    return (int(s[11]) + int(s[12])) / tick

daemon, standin, ws = sys.argv[1:4]
pids = [p for p in os.listdir("/proc") if p.isdigit()]
postmaster = None
for p in pids:
    try:
        with open(f"/proc/{p}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        continue
    if argv[0].endswith(b"/postgres") and any(ws.encode() in a for a in argv):
        postmaster = p
pg = 0.0
if postmaster:
    s = stat(postmaster)
    pg = sum(int(x) for x in s[11:15]) / tick
    for p in pids:
        try:
            s = stat(p)
        except OSError:
            continue
        if s[1] == postmaster:
            pg += (int(s[11]) + int(s[12])) / tick
print(json.dumps({"daemon_s": own(daemon), "postgres_s": pg, "standin_s": own(standin)}))
EOF
}

WS=""
DAEMON_PID=""
STANDIN_PID=""

stop_stack() {
    if [ -n "$DAEMON_PID" ]; then
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
        DAEMON_PID=""
    fi
    if [ -n "$STANDIN_PID" ]; then
        kill -TERM "$STANDIN_PID" 2>/dev/null || true
        wait "$STANDIN_PID" 2>/dev/null || true
        STANDIN_PID=""
    fi
    if [ -n "$WS" ]; then
        rm -rf "$WS"
        WS=""
    fi
}
trap stop_stack EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts the stand-in and a daemon on a fresh state directory; sets WS,
# HTTP (host:port) and SOCKET.
start_stack() {
    WS=$(mktemp -d /tmp/convstore-bench.XXXXXX)
    # The managed PostgreSQL runs as another account when we are root.
    chmod 0755 "$WS"
    "$BIN" standin --listen 127.0.0.1:0 --model "$MODEL" --dimensions "$DIMS" \
        --context-length "$CONTEXT" >"$WS/standin.out" 2>"$WS/standin.log" &
    STANDIN_PID=$!
    local standin=""
    for _ in $(seq 100); do
        standin=$(sed -n 's/^listening on //p' "$WS/standin.out")
        [ -n "$standin" ] && break
        sleep 0.1
    done
    [ -n "$standin" ] || die "the stand-in did not start: $(cat "$WS/standin.log")"
    HTTP="127.0.0.1:$(free_port)"
    SOCKET="$WS/convstore.sock"
    cat >"$WS/convstore.toml" <<EOF
state_dir = "$WS/state"

[server]
http_addr = "$HTTP"
unix_socket = "$SOCKET"

[embedding]
model = "$MODEL"
dimensions = $DIMS

[[embedding.backends]]
name = "standin"
kind = "ollama"
url = "http://$standin"
EOF
    RUST_LOG=warn "$BIN" serve --config "$WS/convstore.toml" 2>"$WS/daemon.log" &
    DAEMON_PID=$!
    for _ in $(seq 300); do
        if python3 - "$HTTP" <<'EOF' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}/readyz", timeout=1)
EOF
        kill -0 "$DAEMON_PID" 2>/dev/null || die "the daemon exited: $(tail -n 20 "$WS/daemon.log")"
        sleep 0.2
    done
    die "the daemon was not ready after 60 s: $(tail -n 20 "$WS/daemon.log")"
}

# run NAME ARGS...: one `convstore bench` run, recorded under $OUT.
run() {
    local name=$1
    shift
    log "$name"
    busy >"$OUT/$name.machine.txt"
    cpu >"$OUT/$name.cpu-before"
    "$BIN" bench "$@" --no-progress --run-id "$name" \
        --json "$OUT/$name.json" --markdown "$OUT/$name.md" | tee "$OUT/$name.txt"
    cpu >"$OUT/$name.cpu-after"
}

for rep in $(seq "$REPEAT"); do
    log "repetition $rep of $REPEAT: starting a fresh daemon"
    start_stack
    run "sample-$rep" --socket "$SOCKET" --count 4000 --concurrency 16
    for conns in 1 16; do
        run "ack-unix-c$conns-$rep" --socket "$SOCKET" --count "$ACK_COUNT" --concurrency "$conns" --unique-text
        run "ack-http-c$conns-$rep" --url "http://$HTTP" --count "$ACK_COUNT" --concurrency "$conns" --unique-text
    done
    run "open-unix-$rep" --socket "$SOCKET" --rate "$OPEN_RATE" --duration "$DURATION" --concurrency 16 --unique-text
    run "open-http-$rep" --url "http://$HTTP" --rate "$OPEN_RATE" --duration "$DURATION" --concurrency 16 --unique-text
    stop_stack
done

python3 - "$OUT" >"$OUT/summary.md" <<'EOF'
import glob, json, os, re, statistics, sys

out = sys.argv[1]
runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    stem = os.path.basename(path)[:-5]
    with open(path) as f:
        report = json.load(f)
    try:
        with open(os.path.join(out, stem + ".cpu-before")) as f:
            before = json.load(f)
        with open(os.path.join(out, stem + ".cpu-after")) as f:
            after = json.load(f)
        report["cpu"] = {k: after[k] - before[k] for k in after}
    except (OSError, ValueError, KeyError):
        report["cpu"] = {}
    runs.setdefault(re.sub(r"-\d+$", "", stem), []).append(report)

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

def us(v):
    if v is None:
        return "–"
    return f"{v:.0f} µs" if v < 1000 else f"{v / 1000:.2f} ms"

def num(v, fmt="{:.0f}"):
    return "–" if v is None else fmt.format(v)

def per_conv(r, key):
    n = r["totals"]["accepted"]
    v = r["cpu"].get(key)
    return None if v is None or n == 0 else v * 1e6 / n

with open(os.path.join(out, "machine.txt")) as f:
    print("Machine:\n\n```\n" + f.read().strip() + "\n```\n")
print("Medians of", max(len(r) for r in runs.values()), "runs each.\n")
print("Acknowledgement latency (client side, from the send or, in the open loop, the scheduled send):\n")
print("| run | transport | connections | load | requests | req/s | p50 | p90 | p99 | p99.9 | max | 429 | server enqueue p50 | p99 |")
print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, rs in runs.items():
    m = [r["measured"] for r in rs]
    srv = [r.get("server") or {} for r in rs]
    rate = rs[0]["mode"]["rate"]
    print("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
        name, rs[0]["target"]["transport"], rs[0]["mode"]["connections"],
        f"open {rate:g}/s" if rate else "closed",
        num(med([p["sent"] for p in m])), num(med([p["throughput_rps"] for p in m])),
        us(med([p["latency"]["p50_us"] for p in m])), us(med([p["latency"]["p90_us"] for p in m])),
        us(med([p["latency"]["p99_us"] for p in m])), us(med([p["latency"]["p999_us"] for p in m])),
        us(med([p["latency"]["max_us"] for p in m])), num(med([p["rejected"] for p in m])),
        us(med([x.get("enqueue_p50_us") for x in srv])), us(med([x.get("enqueue_p99_us") for x in srv])),
    ))
print("\nStored (from the daemon's counters; first request to last commit) and CPU per accepted conversation:\n")
print("| run | conversations | chunks | seconds | conv/s | chunks/s | received→committed p95 | daemon CPU | PostgreSQL CPU | stand-in CPU |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, rs in runs.items():
    s = [r.get("stored") or {} for r in rs]
    srv = [r.get("server") or {} for r in rs]
    e2e = med([x.get("end_to_end_p95_ms") for x in srv])
    print("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
        name, num(med([x.get("conversations") for x in s])), num(med([x.get("chunks") for x in s])),
        num(med([x.get("seconds") for x in s]), "{:.1f}"),
        num(med([x.get("conversations_per_s") for x in s])), num(med([x.get("chunks_per_s") for x in s])),
        "–" if e2e is None else f"{e2e:.0f} ms",
        us(med([per_conv(r, "daemon_s") for r in rs])), us(med([per_conv(r, "postgres_s") for r in rs])),
        us(med([per_conv(r, "standin_s") for r in rs])),
    ))
EOF
log "results in $OUT (summary.md)"
cat "$OUT/summary.md"
