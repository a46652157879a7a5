#!/usr/bin/env bash
# Reproduces the measurements in docs/PERFORMANCE.md on this machine, in one
# run, each next to its floor:
#   scripts/bench.sh
#
# Builds the release daemon and the floor server (tools/ack-floor),
# then BENCH_REPEAT times (default 3):
#
# 1. Memory. A fresh daemon (default configuration, managed PostgreSQL in a
#    temp directory; one embedding backend, the Ollama stand-in at zero
#    latency imitating nomic-embed-text: 768 dimensions, 2048 tokens of
#    context; BENCH_MODEL, BENCH_DIMS, BENCH_CONTEXT): RSS idle, then RSS
#    with the default queue full. To fill it, commits are held (a session
#    holds an ACCESS EXCLUSIVE lock on `conversations`, so no batch can
#    commit) and `convstore bench` posts until the daemon answers 429.
# 2. The daemon. A fresh one, configured as above, and `convstore bench`:
#      sample        the whole shared sample once (4,000 conversations, 16
#                    connections): the stored rate, from the daemon's own
#                    counters, first request to last commit;
#      copy-floor    the floor under it: the rows the sample run stored,
#                    exported with binary COPY and loaded again with binary
#                    COPY, in one transaction, into a copy of the schema
#                    (same columns, constraints, foreign key and indexes,
#                    HNSW included) in the same cluster;
#      reingest      the same sample again under new ids: cache hits and
#                    backend calls for texts the daemon has seen;
#      ack-<t>-c<n>  single posts, closed loop, over <t> = unix | http with
#                    <n> = 1 | 16 connections, BENCH_ACK_COUNT requests
#                    each (default 4000), every request with new text;
#      open-<t>      single posts, open loop at BENCH_OPEN_RATE per second
#                    (default: half the stored rate the sample run reached,
#                    a burst into an empty index, so more than half what
#                    the machine sustains) for BENCH_DURATION seconds
#                    (default 20): latency from the scheduled send time,
#                    and received→committed.
#      *-held        the ack and open runs again, with commits held (the
#                    queue keeps everything, PostgreSQL does nothing): the
#                    acknowledgement path without storage competing for
#                    the CPU; what was held is stored before the next run.
#    Then the daemon's RSS again, with the L1 cache as the runs left it.
#      *-floor-storing  the floor server (below) under the same ack and
#                    open runs while this daemon stores what its own
#                    storing run of that name had to store: the floor on
#                    a machine as busy as convstore's storing run had it.
#    Then the sustained rate, on a fresh daemon:
#      sustained     an open loop offering the sample run's stored rate
#                    for BENCH_SUSTAIN_DURATION seconds (default 30): more
#                    than the daemon stores once its index grows, so the
#                    queue fills and the rest is answered 429; what it
#                    stored, first request to last commit, is the maximum
#                    sustained rate;
#      sustained-half  on the same daemon and its grown index, an open
#                    loop at half that rate for BENCH_DURATION seconds:
#                    received→committed at half the sustained rate.
# 3. The floor server (tools/ack-floor: read the body, push it onto a
#    channel, answer 202) under the same ack and open runs, alone.
# 4. The Ollama-like stand-in (BENCH_OLLAMA_MS per request + BENCH_OLLAMA_
#    PER_INPUT_MS per input, default 15 + 0.5, one request at a time per
#    backend) with 1 and 3 backends: the sample's stored rate.
#
# Every run writes JSON, Markdown and the printed table under BENCH_OUT
# (default target/bench-results/<UTC time>/), with the load average and the
# busiest processes before each run (the machine may be shared) and the CPU
# time the daemon, its PostgreSQL and the stand-in used during it.
# summary.md (scripts/bench_summary.py) holds the medians, each next to its
# floor and as a ratio to it. The shared sample is used when it is there
# (../shared/data or CONVSTORE_SAMPLE), else generated conversations.
#
# One repetition takes about 8 minutes on a 2-core machine. The criterion
# micro-benchmarks are separate: cargo bench --bench hot_paths (and
# enqueue_metrics, store_write).
set -euo pipefail
cd "$(dirname "$0")/.."

REPEAT=${BENCH_REPEAT:-3}
DURATION=${BENCH_DURATION:-20}
SUSTAIN_DURATION=${BENCH_SUSTAIN_DURATION:-30}
ACK_COUNT=${BENCH_ACK_COUNT:-4000}
OPEN_RATE=${BENCH_OPEN_RATE:-}
OLLAMA_MS=${BENCH_OLLAMA_MS:-15}
OLLAMA_PER_INPUT_MS=${BENCH_OLLAMA_PER_INPUT_MS:-0.5}
# The embedding model the stand-in imitates (Ollama's nomic-embed-text).
MODEL=${BENCH_MODEL:-nomic-embed-text}
DIMS=${BENCH_DIMS:-768}
CONTEXT=${BENCH_CONTEXT:-2048}
OUT=${BENCH_OUT:-target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN="$TARGET_DIR/release/convstore"
FLOOR_BIN="$TARGET_DIR/release/convstore-ack-floor"
STANDIN_BIN="$TARGET_DIR/release/convstore-standin"

log() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

scripts/setup.sh
cargo build --release --locked -p convstore -p convstore-ack-floor -p convstore-standin
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# psql of the PostgreSQL setup.sh installed (the managed cluster's own).
if [ "$(id -u)" = 0 ]; then
    PGINSTALL=${CONVSTORE_PGINSTALL_DIR:-/usr/local/lib/convstore/pginstall}
else
    PGINSTALL=${CONVSTORE_PGINSTALL_DIR:-$HOME/.local/lib/convstore/pginstall}
fi
PSQL="$PGINSTALL/bin/psql"
[ -x "$PSQL" ] || die "no psql at $PSQL (scripts/setup.sh installs it)"

machine() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "kernel: $(uname -srm)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) online"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "rustc: $(rustc --version)"
    echo "postgres: $("$PGINSTALL/bin/postgres" --version)"
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
}
machine >"$OUT/machine.txt"

# The busiest processes over the last second, for the record of what else
# was running.
busy() {
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
    top -b -n 2 -d 1 -w 160 | awk '/^top -/ { n++ } n == 2' | sed -n '7,16p'
}

WS=""
DAEMON_PID=""
STANDIN_PIDS=()
FLOOR_PID=""
LOCK_PID=""

# CPU seconds used so far by the daemon (or the floor server), its
# PostgreSQL (postmaster, live backends, and backends that exited) and the
# stand-ins, as JSON. CPU time does not depend on what else runs on the
# machine, unlike wall time.
cpu() {
    python3 - "${DAEMON_PID:-$FLOOR_PID}" "$WS" "${STANDIN_PIDS[@]}" <<'EOF'
import json, os, sys

tick = os.sysconf("SC_CLK_TCK")

def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # Fields after "(comm) ": state, ppid, ... utime is field 14.
    return text[text.rindex(")") + 2:].split()

def own(pid):
    try:
        s = stat(pid)
    except (OSError, ValueError):
        return 0.0
    return (int(s[11]) + int(s[12])) / tick

daemon, ws, standins = sys.argv[1], sys.argv[2], sys.argv[3:]
pids = [p for p in os.listdir("/proc") if p.isdigit()]
postmaster = None
for p in pids:
    try:
        with open(f"/proc/{p}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        continue
    if ws and argv[0].endswith(b"/postgres") and any(ws.encode() in a for a in argv):
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
print(json.dumps({
    "daemon_s": own(daemon) if daemon else 0.0,
    "postgres_s": pg,
    "standin_s": sum(own(p) for p in standins),
}))
EOF
}

stop_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_stack() {
    stop_pid "$LOCK_PID"
    LOCK_PID=""
    stop_pid "$DAEMON_PID"
    DAEMON_PID=""
    stop_pid "$FLOOR_PID"
    FLOOR_PID=""
    for pid in "${STANDIN_PIDS[@]}"; do
        stop_pid "$pid"
    done
    STANDIN_PIDS=()
    if [ -n "$WS" ]; then
        rm -rf "$WS"
        WS=""
    fi
}
trap stop_stack EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for_line FILE: the address after "listening on " in FILE, once there.
wait_for_line() {
    local addr=""
    for _ in $(seq 100); do
        addr=$(sed -n 's/^listening on //p' "$1")
        [ -n "$addr" ] && { echo "$addr"; return 0; }
        sleep 0.1
    done
    return 1
}

# start_stack BACKENDS MS PER_INPUT_MS: BACKENDS stand-ins with that
# latency, and a daemon on a fresh state directory; sets WS, HTTP
# (host:port), SOCKET and DB (a psql connection string).
start_stack() {
    local backends=$1 ms=$2 per_input=$3
    WS=$(mktemp -d /tmp/convstore-bench.XXXXXX)
    # The managed PostgreSQL runs as another account when we are root.
    chmod 0755 "$WS"
    HTTP="127.0.0.1:$(free_port)"
    SOCKET="$WS/convstore.sock"
    DB="host=$WS/state/postgres/run port=5432 user=convstore dbname=convstore"
    cat >"$WS/convstore.toml" <<EOF
state_dir = "$WS/state"

[server]
http_addr = "$HTTP"
unix_socket = "$SOCKET"

[embedding]
model = "$MODEL"
dimensions = $DIMS
EOF
    for i in $(seq "$backends"); do
        "$STANDIN_BIN" --listen 127.0.0.1:0 --model "$MODEL" --dimensions "$DIMS" \
            --context-length "$CONTEXT" --latency-ms "$ms" --per-input-ms "$per_input" \
            >"$WS/standin-$i.out" 2>"$WS/standin-$i.log" &
        STANDIN_PIDS+=($!)
        local standin
        standin=$(wait_for_line "$WS/standin-$i.out") ||
            die "stand-in $i did not start: $(cat "$WS/standin-$i.log")"
        cat >>"$WS/convstore.toml" <<EOF

[[embedding.backends]]
name = "standin-$i"
kind = "ollama"
url = "http://$standin"
EOF
    done
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

# The floor server on a fresh directory; sets WS, HTTP and SOCKET.
start_floor() {
    WS=$(mktemp -d /tmp/convstore-bench.XXXXXX)
    SOCKET="$WS/floor.sock"
    "$FLOOR_BIN" 127.0.0.1:0 "$SOCKET" >"$WS/floor.out" 2>"$WS/floor.log" &
    FLOOR_PID=$!
    HTTP=$(wait_for_line "$WS/floor.out") || die "the floor server did not start: $(cat "$WS/floor.log")"
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

# stored_rate REPORT DIVISOR: the stored conversations per second of a
# `convstore bench` JSON report, divided by DIVISOR, as a whole rate of at
# least 1 (an open loop's --rate).
stored_rate() {
    python3 -c 'import json, sys; print(max(1, round(json.load(open(sys.argv[1]))["stored"]["conversations_per_s"] / float(sys.argv[2]))))' "$1" "$2"
}

psql_db() {
    "$PSQL" -X -q -v ON_ERROR_STOP=1 "$DB" "$@"
}

# memory NAME: the daemon's RSS and peak RSS (kB), its queue depth and L1
# cache entries, as JSON in $OUT/NAME.memory.json.
memory() {
    python3 - "$DAEMON_PID" "$HTTP" >"$OUT/$1.memory.json" <<'EOF'
import json, sys, urllib.request

pid, http = sys.argv[1:3]
status = {}
with open(f"/proc/{pid}/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        status[key] = value.split()[0] if value.split() else ""
metrics = {}
text = urllib.request.urlopen(f"http://{http}/metrics", timeout=10).read().decode()
for line in text.splitlines():
    if line.startswith("#") or not line.strip():
        continue
    name = line.split("{")[0].split()[0]
    metrics[name] = metrics.get(name, 0.0) + float(line.rsplit(None, 1)[1])
print(json.dumps({
    "rss_kb": int(status["VmRSS"]),
    "peak_rss_kb": int(status["VmHWM"]),
    "queue_depth": metrics.get("convstore_queue_depth"),
    "queue_bytes": metrics.get("convstore_queue_bytes"),
    "cache_entries": metrics.get("convstore_cache_entries"),
}))
EOF
    log "$1: $(cat "$OUT/$1.memory.json")"
}

# hold_commits: a session takes an ACCESS EXCLUSIVE lock on conversations
# and keeps it, so no batch can commit: the daemon's storage work (and its
# PostgreSQL's CPU) stops, the queue keeps what arrives.
hold_commits() {
    psql_db -c "SET application_name = 'bench-lock'" \
        -c "BEGIN" -c "LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE" \
        -c "SELECT pg_sleep(3600)" >/dev/null 2>&1 &
    LOCK_PID=$!
    for _ in $(seq 100); do
        [ "$(psql_db -At -c "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'conversations' AND l.mode = 'AccessExclusiveLock' AND l.granted")" = 1 ] && return 0
        sleep 0.1
    done
    die "the lock on conversations was not granted"
}

# release_commits: ends the lock session, then waits until the daemon has
# stored everything it holds (queue empty, nothing in flight).
release_commits() {
    psql_db -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'bench-lock'" >/dev/null
    wait "$LOCK_PID" 2>/dev/null || true
    LOCK_PID=""
    wait_drained "$HTTP" || die "the daemon did not drain after the lock was released"
}

# wait_drained HTTP: until the daemon at HTTP has stored everything it
# holds (queue empty, nothing in flight); fails after 10 minutes.
wait_drained() {
    python3 - "$1" <<'EOF'
import sys, time, urllib.request

def backlog():
    text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in ("convstore_queue_depth", "convstore_pipeline_in_flight_conversations"):
            total += float(line.rsplit(None, 1)[1])
    return total

deadline = time.monotonic() + 600
while backlog() > 0:
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.5)
EOF
}

# queue_full NAME: fills the default queue behind held commits, then
# records memory NAME.
queue_full() {
    local name=$1
    log "$name: commits held, posting until 429"
    hold_commits
    # The queue holds 10,000; workers hold a few batches more, blocked.
    run "$name" --socket "$SOCKET" --count 12000 --concurrency 16 --unique-text --no-wait
    sleep 2
    memory "$name"
    release_commits
}

# run_held NAME ARGS...: `run`, with the daemon's commits held for its
# length: the acknowledgement path without storage competing for the CPU.
run_held() {
    local name=$1
    shift
    hold_commits
    run "$name" "$@" --no-wait
    release_commits
}

# run_beside_storage NAME ARGS...: `run` against the floor server ($SOCKET,
# $HTTP) while the daemon ($DAEMON_SOCKET) stores what its own storing run
# of the same name had to store: for a closed loop, BENCH_ACK_COUNT new
# conversations posted just before; for an open loop (--rate), the same
# rate posted to the daemon for the length of the run. So the floor is
# measured on a machine as busy as it was under convstore's storing run.
run_beside_storage() {
    local name=$1
    shift
    if [[ " $* " == *" --rate "* ]]; then
        "$BIN" bench --socket "$DAEMON_SOCKET" --rate "$RATE" --duration "$DURATION" --concurrency 16 \
            --unique-text --no-wait --no-progress --run-id "$name-load" >/dev/null &
        local load=$!
        run "$name" "$@"
        wait "$load" || die "$name: the daemon's load failed"
    else
        "$BIN" bench --socket "$DAEMON_SOCKET" --count "$ACK_COUNT" --concurrency 16 \
            --unique-text --no-wait --no-progress --run-id "$name-load" >/dev/null
        run "$name" "$@"
    fi
    wait_drained "$DAEMON_HTTP" || die "$name: the daemon did not drain"
}

# copy_floor NAME RUN STREAMS: the rows run RUN stored, out with binary
# COPY and in again, timed, into floor.* (a copy of the schema: columns,
# constraints, foreign key, indexes, HNSW included; empty, as the daemon's
# tables were when RUN began). STREAMS sessions load a share of the rows
# each, at once, each in one transaction: conversations, then their chunks
# (the foreign key). The daemon writes with pipeline.workers (4) sessions,
# so one stream would understate what PostgreSQL can take. JSON in
# NAME.json.
copy_floor() {
    local name=$1 run_id=$2 streams=$3
    log "$name ($streams streams)"
    local share chunk_columns
    # Every column but the generated ones (content_tsv): COPY FROM computes
    # those, as it does for the daemon's rows.
    chunk_columns=$(psql_db -At -c "SELECT string_agg('k.' || quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'conversation_chunks'::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = ''")
    for i in $(seq 0 $((streams - 1))); do
        share="c.client_id LIKE 'bench-$run_id-%' AND (hashtext(c.id::text) & 2147483647) % $streams = $i"
        psql_db -c "\\copy (SELECT c.* FROM conversations c WHERE $share) TO '$WS/conversations-$i.copy' (FORMAT binary)"
        psql_db -c "\\copy (SELECT $chunk_columns FROM conversation_chunks k JOIN conversations c ON c.id = k.conversation_id WHERE $share) TO '$WS/chunks-$i.copy' (FORMAT binary)"
    done
    psql_db -c "DROP SCHEMA IF EXISTS floor CASCADE" -c "CREATE SCHEMA floor" \
        -c "CREATE TABLE floor.conversations (LIKE public.conversations INCLUDING ALL)" \
        -c "CREATE TABLE floor.conversation_chunks (LIKE public.conversation_chunks INCLUDING ALL)" \
        -c "ALTER TABLE floor.conversation_chunks ADD FOREIGN KEY (user_id, conversation_id) REFERENCES floor.conversations (user_id, id) ON DELETE CASCADE" \
        -c "CHECKPOINT"
    busy >"$OUT/$name.machine.txt"
    cpu >"$OUT/$name.cpu-before"
    local started ended pids=()
    started=$(date +%s.%N)
    for i in $(seq 0 $((streams - 1))); do
        psql_db -1 -c "\\copy floor.conversations FROM '$WS/conversations-$i.copy' (FORMAT binary)" \
            -c "\\copy floor.conversation_chunks FROM '$WS/chunks-$i.copy' (FORMAT binary)" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || die "$name: a COPY stream failed"
    done
    ended=$(date +%s.%N)
    cpu >"$OUT/$name.cpu-after"
    local conversations chunks
    conversations=$(psql_db -At -c "SELECT count(*) FROM floor.conversations")
    chunks=$(psql_db -At -c "SELECT count(*) FROM floor.conversation_chunks")
    python3 - "$conversations" "$chunks" "$started" "$ended" "$streams" >"$OUT/$name.json" <<'EOF'
import json, sys
conversations, chunks = int(sys.argv[1]), int(sys.argv[2])
seconds = float(sys.argv[4]) - float(sys.argv[3])
print(json.dumps({"copy_floor": {
    "streams": int(sys.argv[5]), "conversations": conversations, "chunks": chunks,
    "seconds": seconds, "conversations_per_s": conversations / seconds,
    "chunks_per_s": chunks / seconds,
}}))
EOF
    log "$name: $(cat "$OUT/$name.json")"
    psql_db -c "DROP SCHEMA floor CASCADE"
    rm -f "$WS"/*.copy
}

# ack_runs SUFFIX RUNNER ARGS...: the single-post runs, by RUNNER (run or
# run_held), against whatever listens on $SOCKET and $HTTP.
ack_runs() {
    local suffix=$1 runner=$2
    shift 2
    for conns in 1 16; do
        "$runner" "ack-unix-c$conns$suffix" --socket "$SOCKET" --count "$ACK_COUNT" --concurrency "$conns" --unique-text "$@"
        "$runner" "ack-http-c$conns$suffix" --url "http://$HTTP" --count "$ACK_COUNT" --concurrency "$conns" --unique-text "$@"
    done
    "$runner" "open-unix$suffix" --socket "$SOCKET" --rate "$RATE" --duration "$DURATION" --concurrency 16 --unique-text "$@"
    "$runner" "open-http$suffix" --url "http://$HTTP" --rate "$RATE" --duration "$DURATION" --concurrency 16 --unique-text "$@"
}

for rep in $(seq "$REPEAT"); do
    log "repetition $rep of $REPEAT"

    start_stack 1 0 0
    sleep 2
    memory "rss-idle-$rep"
    queue_full "queue-full-$rep"
    stop_stack

    start_stack 1 0 0
    run "sample-$rep" --socket "$SOCKET" --count 4000 --concurrency 16
    copy_floor "copy-floor-1stream-$rep" "sample-$rep" 1
    copy_floor "copy-floor-4streams-$rep" "sample-$rep" 4
    run "reingest-$rep" --socket "$SOCKET" --count 4000 --concurrency 16
    RATE=$OPEN_RATE
    if [ -z "$RATE" ]; then
        RATE=$(stored_rate "$OUT/sample-$rep.json" 2)
    fi
    echo "$RATE" >"$OUT/open-rate-$rep"
    ack_runs "-$rep" run
    ack_runs "-held-$rep" run_held
    memory "rss-after-$rep"
    # The floor again, beside the same storage load: the daemon keeps
    # storing while the floor answers.
    DAEMON_SOCKET=$SOCKET
    DAEMON_HTTP=$HTTP
    DAEMON_WS=$WS
    start_floor
    ack_runs "-floor-storing-$rep" run_beside_storage --no-wait
    stop_pid "$FLOOR_PID"
    FLOOR_PID=""
    rm -rf "$WS"
    SOCKET=$DAEMON_SOCKET
    HTTP=$DAEMON_HTTP
    WS=$DAEMON_WS
    stop_stack

    start_stack 1 0 0
    OFFER=$(stored_rate "$OUT/sample-$rep.json" 1)
    run "sustained-$rep" --socket "$SOCKET" --rate "$OFFER" --duration "$SUSTAIN_DURATION" --unique-text
    HALF=$(stored_rate "$OUT/sustained-$rep.json" 2)
    echo "$HALF" >"$OUT/sustained-half-rate-$rep"
    run "sustained-half-$rep" --socket "$SOCKET" --rate "$HALF" --duration "$DURATION" --concurrency 16 --unique-text
    stop_stack

    start_floor
    ack_runs "-floor-$rep" run --no-wait
    stop_stack

    for backends in 1 3; do
        start_stack "$backends" "$OLLAMA_MS" "$OLLAMA_PER_INPUT_MS"
        run "ollama-$backends-$rep" --socket "$SOCKET" --count 4000 --concurrency 16
        stop_stack
    done
done

python3 scripts/bench_summary.py "$OUT" >"$OUT/summary.md"
log "results in $OUT (summary.md)"
cat "$OUT/summary.md"
