#!/usr/bin/env bash
# Peak memory of `ferry extract`, `ferry verify` and `ferry restore` on a
# large JSON Lines file (default 1 GiB), measured with /usr/bin/time -v.
# The target for extract is at most 64 MiB whatever the input's size.
#
#   bash benches/extract-memory.sh [BYTES]
set -euo pipefail
cd "$(dirname "$0")/.."
bytes=${1:-$((1024 * 1024 * 1024))}
if [ ! -x /usr/bin/time ]; then
    apt-get install -y time >/dev/null
fi
cargo build --release --quiet -p ferry-cli -p ferry-benches
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-memory.XXXXXX")
trap 'rm -rf "$work"' EXIT
target/release/pachyderm-jsonl "$bytes" > "$work/in.jsonl"
echo "input: $(stat -c %s "$work/in.jsonl") bytes, $(wc -l < "$work/in.jsonl") ops"

measure() {
    local name=$1
    shift
    /usr/bin/time -v "$@" 2> "$work/time.txt" > "$work/out.txt"
    local rss_kib seconds
    rss_kib=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$work/time.txt")
    seconds=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$work/time.txt")
    printf '%-8s peak RSS %6.1f MiB, wall %s\n' "$name" "$(awk "BEGIN { print $rss_kib / 1024 }")" "$seconds"
}
measure extract target/release/ferry extract --source "jsonl://$work/in.jsonl" --to "file://$work/store" --quiet
measure verify target/release/ferry verify "file://$work/store" --quiet
measure restore target/release/ferry restore --from "file://$work/store" --target "jsonl://$work/out.jsonl" --quiet
echo "target: extract peak RSS at most 64 MiB"
