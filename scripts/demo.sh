#!/usr/bin/env bash
# ferry's main job on this machine, in under a minute:
#
# 1. a live migration: two local etcds (the old one holding a sample
#    control plane), the two agents and a gateway; writers keep writing
#    through the gateway while `ferry migrate --live` copies the old etcd,
#    follows it, and cuts over; the script then checks that every write the
#    gateway acknowledged is in the new etcd and that the old one took none
#    after the fence;
# 2. a backup of the new etcd into a file:// store, checked and restored.
#
# etcd and etcdctl come from Debian's packages; when they are missing the
# script says the command and runs it (as root, or with sudo). Everything
# it starts is stopped, and its folder removed, when it ends
# (FERRY_DEMO_KEEP=1 keeps the folder).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain"; }
note() { printf '%s# %s%s\n' "$bold" "$*" "$plain"; }
fail() { printf 'demo failed: %s\n' "$*" >&2; exit 1; }

# etcd, installed when missing (the same command .ci/run and scripts/test.sh run).
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
    install="apt-get install -y etcd-server etcd-client"
    [ "$(id -u)" = 0 ] || install="sudo $install"
    note "etcd is missing: installing it with \`$install\`"
    $install >/dev/null || fail "could not install etcd; run \`$install\` yourself"
fi

# CI sets FERRY_DEMO_PROFILE=dev to reuse the test build instead of a release one.
profile=${FERRY_DEMO_PROFILE:-release}
cargo build --profile "$profile" --quiet -p ferry-cli
# Where cargo put it: CARGO_TARGET_DIR when set (relative to here), else ./target.
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
if [ "$profile" = dev ]; then ferry=$target/debug/ferry; else ferry=$target/$profile/ferry; fi
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${FERRY_DEMO_KEEP:-}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# A free port on 127.0.0.1 (nothing answers there).
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
    done
}

# Starts an etcd named $1; sets `started` to its client address. (Not in a
# command substitution: its subshell would keep the pid from `cleanup`.) A
# port found free can be taken before etcd binds it ("address already in
# use"): then it starts again on other ports.
start_etcd() {
    local name=$1 client peer pid
    for _ in 1 2 3 4 5; do
        client=$(free_port)
        peer=$(free_port)
        rm -rf "${work:?}/$name"
        etcd --name "$name" --data-dir "$work/$name" --log-level error --logger zap \
            --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
            --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
            --initial-cluster "$name=http://127.0.0.1:$peer" >"$work/$name.log" 2>&1 &
        pid=$!
        pids+=("$pid")
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            if ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$client" --dial-timeout 1s --command-timeout 2s \
                endpoint health >/dev/null 2>&1; then
                started=127.0.0.1:$client
                return
            fi
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        grep -q 'address already in use' "$work/$name.log" || break
    done
    fail "etcd $name did not start: $(tail -n 3 "$work/$name.log")"
}

# Starts `ferry ARGS... --output json` in the background; sets `started` to
# its first line (where it listens) once it serves.
start_ferry() {
    local log=$1
    shift
    "$ferry" --output json "$@" >"$work/$log.out" 2>"$work/$log.log" &
    pids+=($!)
    for _ in $(seq 100); do
        if [ -s "$work/$log.out" ]; then started=$(sed -n 1p "$work/$log.out"); return; fi
        sleep 0.1
    done
    fail "ferry $* did not start: $(tail -n 3 "$work/$log.log")"
}
field() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p"; }
etcdctl_at() { ETCDCTL_API=3 etcdctl --endpoints "$1" "${@:2}"; }
count_keys() { etcdctl_at "$1" get --prefix "$2" --keys-only | sed '/^$/d' | wc -l; }

note "1. a live migration of a running control plane"
start_etcd old
old=$started
start_etcd new
new=$started
echo "old etcd on $old, new etcd on $new"

# The sample Pachyderm 1.12 records, as the key-value pairs etcd keeps them in.
sed 's/"kind":"[^"]*"/"kind":"etcd.kv"/' examples/pachyderm-1.12.jsonl >"$work/sample.jsonl"
step ferry extract --source "jsonl://sample.jsonl" --to "file://$work/sample"
"$ferry" extract --quiet --source "jsonl://$work/sample.jsonl" --to "file://$work/sample" >/dev/null
step ferry restore --from "file://$work/sample" --target "etcd://$old"
"$ferry" restore --quiet --from "file://$work/sample" --target "etcd://$old"
echo "the old etcd holds $(count_keys "$old" /pachyderm/) keys of a Pachyderm 1.12 control plane"

step ferry agent source --control-plane "etcd://$old" --listen 127.0.0.1:0 '&'
start_ferry source-agent agent source --control-plane "etcd://$old" --listen 127.0.0.1:0
source_agent=$(echo "$started" | field listen)
step ferry agent target --control-plane "etcd://$new" --listen 127.0.0.1:0 '&'
start_ferry target-agent agent target --control-plane "etcd://$new" --listen 127.0.0.1:0
target_agent=$(echo "$started" | field listen)
step ferry gateway --listen 127.0.0.1:0 --upstream "etcd://$old" '&'
start_ferry gateway gateway --listen 127.0.0.1:0 --upstream "etcd://$old"
gateway=$started
gateway_listen=$(echo "$gateway" | field listen)
gateway_admin=$(echo "$gateway" | field admin)
echo "agents on $source_agent and $target_agent; clients use the gateway on $gateway_listen"

# Writers: each puts its own keys through the gateway, one at a time, and
# logs every write the gateway acknowledged.
note "3 writers put keys through the gateway, all through the migration"
writer() {
    local id=$1 n=0
    while [ ! -e "$work/stop" ]; do
        n=$((n + 1))
        if etcdctl_at "$gateway_listen" --command-timeout 10s put "/pachyderm/demo/writer-$id/$n" "w$id-$n" >/dev/null 2>&1; then
            echo "/pachyderm/demo/writer-$id/$n w$id-$n" >>"$work/acked-$id"
        fi
    done
}
for id in 1 2 3; do writer "$id" & pids+=($!); done
sleep 2

step ferry migrate --live --source-agent "$source_agent" --target-agent "$target_agent" --gateway "$gateway_admin" --max-pause 2s --verify
"$ferry" --output json migrate --live --source-agent "$source_agent" --target-agent "$target_agent" \
    --gateway "$gateway_admin" --max-pause 2s --max-lag 50 --verify --follow-at-least 2s \
    --status-file "$work/status.json" >"$work/report.json" 2>"$work/migrate.log" ||
    fail "the migration did not switch: $(cat "$work/report.json") $(tail -n 5 "$work/migrate.log")"
sleep 2
touch "$work/stop"
for id in 1 2 3; do wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; done
report=$(cat "$work/report.json")
number() { echo "$report" | tr -d ' \n' | sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
ms() { printf '%.0f' "$(number "$1")"; }
echo "switched at epoch $(number epoch): the old etcd fenced at revision $(number fenced_position), $(number ops_moved) ops moved, $(number verified_keys) keys verified"
echo "writes paused $(ms pause_window_ms) ms (hold $(ms hold_ms), fence $(ms fence_ms), drain $(ms drain_ms), verify $(ms verify_ms)); $(number released_writes) held writes released to the new etcd"

note "nothing lost: every write the gateway acknowledged is in the new etcd"
cat "$work"/acked-* | sort >"$work/acked"
acked=$(wc -l <"$work/acked")
etcdctl_at "$new" get --prefix /pachyderm/demo/ | paste -d ' ' - - | sort >"$work/in-new"
missing=$(comm -23 "$work/acked" "$work/in-new" | wc -l)
[ "$acked" -gt 0 ] || fail "no write was acknowledged"
[ "$missing" = 0 ] || fail "$missing of $acked acknowledged writes are not in the new etcd: $(comm -23 "$work/acked" "$work/in-new" | head -n 3)"
echo "$acked acknowledged writes, all in the new etcd"
fenced=$(number fenced_position)
last_old=$(etcdctl_at "$old" get --prefix /pachyderm/ --sort-by=MODIFY --order=DESCEND --limit 1 -w json | sed -n 's/.*"mod_revision":\([0-9]*\).*/\1/p')
[ "${last_old:-0}" -lt "$fenced" ] || fail "the old etcd took a write at revision $last_old, after its fence at $fenced"
echo "the old etcd's last write to /pachyderm/ is at revision $last_old, before its fence at $fenced"
etcdctl_at "$gateway_listen" put /pachyderm/demo/after-the-switch yes >/dev/null
[ "$(etcdctl_at "$new" get /pachyderm/demo/after-the-switch --print-value-only)" = yes ] ||
    fail "a write after the switch did not reach the new etcd"
echo "and the gateway now sends writes to the new etcd"

note "2. a backup of the new etcd, checked, and restored"
store="file://$work/store"
step ferry extract --source "etcd://$new" --prefix /pachyderm/ --to "$store"
backup_id=$("$ferry" extract --quiet --source "etcd://$new" --prefix /pachyderm/ --to "$store")
step ferry inspect "$store"
"$ferry" inspect "$store"
step ferry verify "$store" --backup "$backup_id"
"$ferry" verify "$store" --backup "$backup_id"
step ferry restore --from "$store" --backup "$backup_id" --target "jsonl://$work/restored.jsonl"
"$ferry" restore --from "$store" --backup "$backup_id" --target "jsonl://$work/restored.jsonl"
keys=$(count_keys "$new" /pachyderm/)
[ "$(wc -l <"$work/restored.jsonl")" = "$keys" ] || fail "the restore gave $(wc -l <"$work/restored.jsonl") ops for $keys keys"
echo "backup $backup_id: $keys keys of the new etcd, every segment checked, restored as $keys ops"
