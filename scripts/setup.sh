#!/usr/bin/env bash
# Installs what convstore's managed mode and its tests need, and nothing more:
#
#  * the portable PostgreSQL 16 with pgvector from the PyPI wheel
#    pgserver==0.1.4, reachable as
#      /usr/local/lib/convstore/pginstall        when run as root,
#      $HOME/.local/lib/convstore/pginstall      otherwise
#    (a symlink to pgserver-0.1.4/pgserver/pginstall beside it: the tree
#    keeps the wheel's layout because its tools find their bundled libpq
#    relative to themselves). CONVSTORE_PGINSTALL_DIR overrides the path;
#    convstore only searches the two default places, so then point
#    database.managed_bin_dir at <dir>/bin;
#  * when root, the system account `convstore` the managed PostgreSQL runs
#    as (PostgreSQL refuses to run as root);
#  * when root and missing, the Debian packages these steps need
#    (python3-pip, ca-certificates).
#
# Idempotent: prints nothing when everything is already in place. Python is
# needed only here, to download the wheel; convstore does not use it.
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

main() {
    # Serialise concurrent runs (parallel test binaries) when flock exists.
    if command -v flock >/dev/null; then
        mkdir -p "$(dirname "$PGINSTALL")"
        exec 9>"$(dirname "$PGINSTALL")/.setup.lock"
        flock 9
    fi
    pg_installed || install_postgres
    pg_installed || die "$PGINSTALL still has no working PostgreSQL with pgvector"
    if is_root; then
        ensure_account
    fi
}

main "$@"
