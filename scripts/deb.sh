#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks what is in it.
#
#   scripts/deb.sh            package the debug binary the tests built (CI:
#                             checks the packaging in seconds, no second build)
#   scripts/deb.sh --release  a release build: the package to ship
#   scripts/deb.sh --no-build package target/debug/convstore as it is
#
# Checks: the files, their modes and the conffile; the packaged binary runs
# and accepts the packaged configuration, which is `check-config
# --print-default`; the units as installed pass `systemd-analyze verify` and
# rate at most 2.0 in `systemd-analyze security`; the maintainer scripts
# create the account but neither enable nor start anything.
#
# Needs cargo-deb (scripts/setup.sh --tests installs it),
# dpkg-deb and systemd-analyze. Prints the package's path.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'deb: error: %s\n' "$*" >&2; exit 1; }
check() { printf 'deb: ok: %s\n' "$*"; }

command -v cargo-deb >/dev/null ||
    die "cargo-deb is missing: scripts/setup.sh --tests (or cargo install --locked cargo-deb)"
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (apt-get install dpkg)"
command -v systemd-analyze >/dev/null || die "systemd-analyze is missing (apt-get install systemd)"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if [ "${1:-}" = "--release" ]; then
    cargo deb -p convstore --locked -o "$out/" >"$out/build.log" 2>&1 ||
        { cat "$out/build.log" >&2; die "cargo deb failed"; }
else
    # cargo-deb warns that a dev profile is for checking, not shipping: it is.
    [ "${1:-}" = "--no-build" ] || cargo build --locked --quiet -p convstore --bin convstore
    [ -x target/debug/convstore ] || die "no target/debug/convstore: cargo build first"
    cargo deb -p convstore --no-build --profile dev --fast -o "$out/" >"$out/build.log" 2>&1 ||
        { cat "$out/build.log" >&2; die "cargo deb failed"; }
fi
deb=$(find "$out" -maxdepth 1 -name 'convstore_*.deb' | head -n 1)
[ -n "$deb" ] || die "cargo deb produced no package"

# --- Files and modes ---------------------------------------------------------
listing=$(dpkg-deb -c "$deb")
expect_file() {
    local mode=$1 path=$2
    grep -Eq "^$mode [^ ]+ +[0-9]+ [0-9-]+ [0-9:]+ \./${path#/}\$" <<<"$listing" ||
        die "$path with mode $mode is not in the package:"$'\n'"$listing"
}
expect_file -rwxr-xr-x /usr/bin/convstore
expect_file -rw-r----- /etc/convstore/convstore.toml
expect_file -rw-r--r-- /usr/lib/systemd/system/convstore.service
expect_file -rw-r--r-- /usr/lib/systemd/system/convstore.socket
expect_file -rw-r--r-- /usr/lib/sysusers.d/convstore.conf
expect_file -rw-r--r-- /usr/share/doc/convstore/README.md
expect_file -rw-r--r-- /usr/share/doc/convstore/SYSTEMD.md
expect_file -rw-r--r-- /usr/share/doc/convstore/examples/convstore.toml
expect_file -rw-r--r-- /usr/share/doc/convstore/copyright
check "files and modes"

control="$out/control"
dpkg-deb -e "$deb" "$control"
grep -qx /etc/convstore/convstore.toml "$control/conffiles" ||
    die "/etc/convstore/convstore.toml is not a conffile"
dpkg-deb -f "$deb" Depends | grep -q systemd || die "Depends does not name systemd (sysusers)"
check "conffile and dependencies"

# --- Maintainer scripts: the account, nothing started ---------------------
grep -q 'systemd-sysusers.*convstore.conf' "$control/postinst" ||
    die "postinst does not create the account with systemd-sysusers"
# Enabling only re-creates links an administrator made (was-enabled);
# starting happens only as try-restart of a unit already running.
if grep -v '^[[:space:]]*#' "$control/postinst" |
    grep -E 'deb-systemd-invoke +start|systemctl +(enable|start)'; then
    die "postinst enables or starts a unit on install"
fi
grep -q 'rm -rf' "$control/postrm" && die "postrm deletes files (the conversations must survive a purge)"
check "maintainer scripts"

# --- What is installed works ----------------------------------------------
root="$out/root"
dpkg-deb -x "$deb" "$root"
"$root/usr/bin/convstore" --version >/dev/null || die "the packaged binary does not run"
env -u CONVSTORE_CONFIG "$root/usr/bin/convstore" check-config --quiet --config "$root/etc/convstore/convstore.toml" ||
    die "the packaged configuration is not valid"
diff -u <("$root/usr/bin/convstore" check-config --print-default) "$root/etc/convstore/convstore.toml" ||
    die "check-config --print-default differs from the packaged configuration"
check "binary and configuration"

# verify needs the default dependencies (sysinit.target, …) in the root.
for dir in /usr/lib/systemd/system /lib/systemd/system; do
    [ -d "$dir" ] || continue
    cp -n "$dir"/* "$root/usr/lib/systemd/system/" 2>/dev/null || true
done
verify=$(systemd-analyze verify --root="$root" convstore.service convstore.socket 2>&1) ||
    die "systemd-analyze verify failed: $verify"
[ -z "$verify" ] || die "systemd-analyze verify: $verify"
score=$(systemd-analyze security --offline=true --no-pager "$root/usr/lib/systemd/system/convstore.service" |
    sed -n 's/.*Overall exposure level for convstore.service: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || die "no exposure level from systemd-analyze security"
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || die "exposure $score > 2.0"
check "units verify, exposure $score"

mkdir -p target/debian
cp "$deb" target/debian/
echo "target/debian/$(basename "$deb")"
