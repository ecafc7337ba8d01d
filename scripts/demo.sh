#!/usr/bin/env bash
# `make demo`: bring the dev stack up, seal files under every KMS backend, read them back, rotate
# the keys; then a patch: hardware-sealed state moves from payments-v1's agents to payments-v2's.
set -euo pipefail
cd "$(dirname "$0")/.."
export REKEY_HOME="${REKEY_HOME:-$PWD/.rekey}"
work="$REKEY_HOME/demo"
mkdir -p "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# The enclave agents this script starts (two simulated hosts, an agent per generation on each):
# stopped on every way out, so nothing is left listening.
agent_pids=()
stop_agents() {
  local pid
  for pid in "${agent_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${agent_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_agents EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_agent MANIFEST GEN HOST: `rekey agent serve --register` for GEN on the simulated host
# $REKEY_HOME/hosts/HOST (where the worker finds its CA), on a free port, registered as agent
# GEN.HOST with its tokens in $REKEY_HOME/agent/GEN.HOST (where the worker looks for that agent's).
# Sets agent_url[GEN.HOST].
declare -A agent_url
start_agent() {
  local manifest=$1 gen=$2 host=$3 log="$work/agent-$2.$3.log" pid tries
  rekey agent serve --manifest "$manifest" --host-dir "$REKEY_HOME/hosts/$host" --register \
    --agent-id "$gen.$host" --state-dir "$REKEY_HOME/agent/$gen.$host" >"$log" 2>&1 &
  pid=$!
  agent_pids+=("$pid")
  for tries in $(seq 300); do
    if grep -q '^registered as agent' "$log"; then
      agent_url[$gen.$host]=$(sed -n 's/.* listening on //p' "$log")
      echo "  $gen on host $host: ${agent_url[$gen.$host]}"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "agent $gen on host $host did not start:" >&2
  cat "$log" >&2
  return 1
}

step "Starting the dev stack (Temporal, OpenBao, moto, Azure Key Vault emulator) under $REKEY_HOME"
rekey dev up

step "Creating a key on each backend"
for key in vault:demo-orders aws:demo-orders azure:demo-orders; do
  rekey key create "$key"
done

step "Registering generation payments-v1"
rekey generation register scripts/demo/gen-v1.yaml
# Which generations may obtain each key's DEKs through the attested release gate.
for key in vault:demo-orders aws:demo-orders azure:demo-orders; do
  rekey key release-policy set "$key" --generation payments-v1
done

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

step "A patch: payments-v1 agents on two simulated hosts (a, b) seal state in hardware"
for host in a b; do start_agent scripts/demo/gen-v1.yaml payments-v1 "$host"; done
for host in a b; do
  for i in 1 2; do
    head -c 512 /dev/urandom > "$work/sealed-$host-$i.bin"
    rekey state put --agent "${agent_url[payments-v1.$host]}" --seal mrenclave \
      --state-dir "$REKEY_HOME/agent/payments-v1.$host" --name "sealed-$host-$i" --in "$work/sealed-$host-$i.bin"
  done
done

step "Registering the patched generation payments-v2 (new measurement, svn 2) as superseding payments-v1"
rekey generation register scripts/demo/gen-v2.yaml --supersedes payments-v1
rekey generation diff payments-v1 payments-v2
for host in a b; do start_agent scripts/demo/gen-v2.yaml payments-v2 "$host"; done

step "Migrating to payments-v2 in two waves: hardware-sealed state by attested hand-off per host, KMS-wrapped state re-bound inside the v2 agents"
# A migration that stops (held) waits for an operator: the demo gives up after two minutes instead.
if ! timeout 120 rekey migrate start --from payments-v1 --to payments-v2 --waves 50,100 --grace 0s --jitter 1s --wait; then
  rekey migrate status migrate:payments-v1:payments-v2 || true
  echo "demo FAILED: the migration did not finish (its status is above)" >&2
  exit 1
fi

step "Reading the migrated state back through payments-v2's agents"
for host in a b; do
  for i in 1 2; do
    f="sealed-$host-$i"
    rm -f "$work/$f.out"
    if ! rekey state get --agent "${agent_url[payments-v2.$host]}" --state-dir "$REKEY_HOME/agent/payments-v2.$host" \
      --name "$f" --out "$work/$f.out"; then
      echo "  $f: could not be read back (the error is above)"; status=1
    elif cmp -s "$work/$f.bin" "$work/$f.out"; then
      echo "  $f: byte-identical"
    else
      echo "  $f: DIFFERS"; status=1
    fi
  done
done

for f in ledger.bin aws-session.bin azure-session.bin; do
  rm -f "$work/$f.v2"
  if ! rekey state get --agent "${agent_url[payments-v2.a]}" --state-dir "$REKEY_HOME/agent/payments-v2.a" \
    --name "$f" --out "$work/$f.v2"; then
    echo "  $f: could not be read back through payments-v2 (the error is above)"; status=1
  elif cmp -s "$work/$f" "$work/$f.v2"; then
    echo "  $f (KMS-wrapped, released to the payments-v2 agent): byte-identical"
  else
    echo "  $f: DIFFERS"; status=1
  fi
done

step "The old generation is refused: payments-v1's agent on host a asked for sealed-a-1 and ledger.bin (errors are expected)"
for f in sealed-a-1 ledger.bin; do
  if rekey state get --agent "${agent_url[payments-v1.a]}" --state-dir "$REKEY_HOME/agent/payments-v1.a" \
    --name "$f" --out "$work/$f.refused"; then
    echo "  UNEXPECTED: payments-v1 still opens $f"; status=1
  else
    echo "  $f refused, as expected: it belongs to payments-v2 now"
  fi
done
stop_agents
agent_pids=()

step "Real hardware evidence: one published sample per platform, verified offline against pinned roots"
# Their certificates and collateral have expired, so each is verified at a time inside its
# validity (vectors/samples.json; provenance in vectors/<platform>/PROVENANCE.md).
v=vectors
rekey attest verify $v/sgx/dcapqvl_sgx_quote_v3.dat --platform sgx \
  --collateral $v/sgx/dcapqvl_sgx_quote_v3_collateral.json --at 2025-07-19T10:01:17Z
rekey attest verify $v/tdx/dcapqvl_tdx_quote_v4.dat --platform tdx \
  --collateral $v/tdx/dcapqvl_tdx_quote_v4_collateral.json --at 2025-07-19T10:00:34Z
rekey attest verify $v/sev-snp/gosevguest_milan_attestation.bin --platform sev-snp \
  --collateral $v/sev-snp/gosevguest_milan_vcek.der --at 2024-06-01T00:00:00Z
rekey attest verify $v/nitro/blocky_nitro_attestation.b64 --platform nitro --at 2024-09-07T15:00:00Z
rekey attest verify $v/maa/teaclave_maa_sgx_token.derived.jwt --platform maa \
  --jwks $v/maa/teaclave_maa_jwks.derived.json --at 2023-09-26T15:00:00Z

step "Verifying the signed audit log"
rekey audit verify

step "Summary"
rekey key list
rekey state list
rekey generation list
rm -f "$work"/*.out "$work"/*.refused "$work"/sealed-*.bin "$work/credentials.txt"
if [ "$status" -ne 0 ]; then echo "demo FAILED: a file did not round-trip" >&2; exit 1; fi
echo
echo "Demo done. The stack is still running (rekey dev status); stop it with: .venv/bin/rekey dev down"
