#!/usr/bin/env bash
# `make demo`: bring the dev stack up, seal three files under a Transit key, read them back.
set -euo pipefail
cd "$(dirname "$0")/.."
export REKEY_HOME="${REKEY_HOME:-$PWD/.rekey}"
work="$REKEY_HOME/demo"
mkdir -p "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting the dev stack (Temporal, OpenBao, moto) under $REKEY_HOME"
rekey dev up

step "Creating the Transit key vault:demo-orders"
rekey key create vault:demo-orders

step "Registering generation payments-v1"
rekey generation register scripts/demo/gen-v1.yaml

step "Sealing three files"
head -c 4096 /dev/urandom > "$work/ledger.bin"
printf 'db-password=%s\n' "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$work/credentials.txt"
head -c 1048576 /dev/urandom > "$work/model-weights.bin"
for f in ledger.bin credentials.txt model-weights.bin; do
  rekey state put --key vault:demo-orders --generation payments-v1 --name "$f" --in "$work/$f"
done

step "Reading them back"
status=0
for f in ledger.bin credentials.txt model-weights.bin; do
  rekey state get --name "$f" --out "$work/$f.out"
  if cmp -s "$work/$f" "$work/$f.out"; then echo "  $f: byte-identical"; else echo "  $f: DIFFERS"; status=1; fi
done

step "Summary"
rekey state list
rm -f "$work"/*.out "$work/credentials.txt"
if [ "$status" -ne 0 ]; then echo "demo FAILED: a file did not round-trip" >&2; exit 1; fi
echo
echo "Demo done. The stack is still running (rekey dev status); stop it with: .venv/bin/rekey dev down"
