#!/usr/bin/env bash
# Builds ferry and runs its main job on a local default: a backup of the
# sample control-plane dump into a file:// store, a look at it, a check of
# every byte, and a restore that must give back the same ops.
set -euo pipefail
cd "$(dirname "$0")/.."

# CI sets FERRY_DEMO_PROFILE=dev to reuse the test build instead of a release one.
profile=${FERRY_DEMO_PROFILE:-release}
cargo build --profile "$profile" --quiet -p ferry-cli
if [ "$profile" = dev ]; then ferry=target/debug/ferry; else ferry=target/$profile/ferry; fi
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
store="file://$work/store"
input="$PWD/examples/pachyderm-1.12.jsonl"

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain"; }

step ferry extract --source "jsonl://$input" --to "$store"
summary=$("$ferry" extract --source "jsonl://$input" --to "$store" --output json)
echo "$summary"
backup_id=$(echo "$summary" | sed -n 's/.*"backup_id": "\(.*\)".*/\1/p')

step ferry inspect "$store"
"$ferry" inspect "$store"

step ferry inspect "$store" --backup "$backup_id"
"$ferry" inspect "$store" --backup "$backup_id"

step ferry verify "$store"
"$ferry" verify "$store"

step ferry restore --from "$store" --target "jsonl://$work/restored.jsonl"
"$ferry" restore --from "$store" --target "jsonl://$work/restored.jsonl"

step "cmp examples/pachyderm-1.12.jsonl restored.jsonl   # the sample is written as ferry writes ops"
if cmp "$input" "$work/restored.jsonl"; then
    echo "identical: $(wc -l < "$work/restored.jsonl") ops restored byte for byte from backup $backup_id"
else
    echo "the restored ops differ from the sample" >&2
    exit 1
fi
echo
echo "the store is at $work/store; remove $work when done"
