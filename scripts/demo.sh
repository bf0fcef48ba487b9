#!/usr/bin/env bash
# Builds ferry and runs its main job on a local default: a backup of the
# sample control-plane dump into a file:// store, a look at it, a check of
# every byte, and a restore that must give back the same ops.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet -p ferry-cli
ferry=target/release/ferry
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
store="file://$work/store"
input="$PWD/examples/pachyderm-1.12.jsonl"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step ferry extract --source "jsonl://$input" --to "$store"
backup_id=$("$ferry" extract --source "jsonl://$input" --to "$store" --output json | tee /dev/stderr | sed -n 's/.*"backup_id": "\(.*\)".*/\1/p')

step ferry inspect "$store"
"$ferry" inspect "$store"

step ferry inspect "$store" --backup "$backup_id"
"$ferry" inspect "$store" --backup "$backup_id"

step ferry verify "$store"
"$ferry" verify "$store"

step ferry restore --from "$store" --target "jsonl://$work/restored.jsonl"
"$ferry" restore --from "$store" --target "jsonl://$work/restored.jsonl"

step "same ops back? (restored lines carry their seq; the rest is identical)"
if diff <(sed -E 's/^\{"seq":[0-9]+,/{/' "$work/restored.jsonl" | python3 -c 'import json,sys; [print(json.dumps(json.loads(l), sort_keys=True)) for l in sys.stdin]' 2>/dev/null || true) \
        <(python3 -c 'import json,sys; [print(json.dumps(json.loads(l), sort_keys=True)) for l in open(sys.argv[1])]' "$input" 2>/dev/null || true) >/dev/null; then
    echo "yes: $(wc -l < "$work/restored.jsonl") ops restored from backup $backup_id"
else
    echo "NO: the restored ops differ" >&2
    exit 1
fi
echo
echo "the store is at $work/store; remove $work when done"
