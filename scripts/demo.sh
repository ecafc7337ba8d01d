#!/usr/bin/env bash
# `make demo`: bring the dev stack up, seal three files under a Transit key, read them back.
set -euo pipefail
cd "$(dirname "$0")/.."
export REKEY_HOME="${REKEY_HOME:-$PWD/.rekey}"
work="$REKEY_HOME/demo"
mkdir -p "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting the dev stack (Temporal, OpenBao, moto, Azure Key Vault emulator) under $REKEY_HOME"
rekey dev up

step "Creating a key on each backend"
for key in vault:demo-orders aws:demo-orders azure:demo-orders; do
  rekey key create "$key"
done

step "Registering generation payments-v1"
rekey generation register scripts/demo/gen-v1.yaml

step "Sealing files: three under OpenBao Transit, one each under AWS KMS (moto) and Azure Managed HSM (emulator)"
head -c 4096 /dev/urandom > "$work/ledger.bin"
printf 'db-password=%s\n' "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$work/credentials.txt"
head -c 1048576 /dev/urandom > "$work/model-weights.bin"
head -c 2048 /dev/urandom > "$work/aws-session.bin"
head -c 2048 /dev/urandom > "$work/azure-session.bin"
for f in ledger.bin credentials.txt model-weights.bin; do
  rekey state put --key vault:demo-orders --generation payments-v1 --name "$f" --in "$work/$f"
done
rekey state put --key aws:demo-orders --generation payments-v1 --name aws-session.bin --in "$work/aws-session.bin"
rekey state put --key azure:demo-orders --generation payments-v1 --name azure-session.bin --in "$work/azure-session.bin"

# Both read-backs alike: every error of `state get` is shown, and one that fails marks the demo failed.
status=0
read_back() {
  local f
  for f in ledger.bin credentials.txt model-weights.bin aws-session.bin azure-session.bin; do
    rm -f "$work/$f.out"
    if ! rekey state get --name "$f" --out "$work/$f.out"; then
      echo "  $f: could not be read back (the error is above)"; status=1
    elif cmp -s "$work/$f" "$work/$f.out"; then
      echo "  $f: byte-identical"
    else
      echo "  $f: DIFFERS"; status=1
    fi
  done
}

step "Reading them back"
read_back

step "Rotating each key in two phases (re-wrap every DEK, verify, retire the old version)"
for key in vault:demo-orders aws:demo-orders azure:demo-orders; do
  rekey rotate start "$key" --grace 0s --wait
done

step "Reading everything back after the rotations"
read_back

step "Verifying the signed audit log"
rekey audit verify

step "Summary"
rekey key list
rekey state list
rm -f "$work"/*.out "$work/credentials.txt"
if [ "$status" -ne 0 ]; then echo "demo FAILED: a file did not round-trip" >&2; exit 1; fi
echo
echo "Demo done. The stack is still running (rekey dev status); stop it with: .venv/bin/rekey dev down"
