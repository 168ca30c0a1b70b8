#!/usr/bin/env bash
# The whole flow on one machine: the owner's keys, a signed guest, the owner's
# key broker, a measured core that attests to it, the VM's keys released to
# that core only, and the guest running. Everything lives in a fresh temporary
# directory and the broker is stopped at the end.
# With swtpm installed (make installs it) a private swtpm is started and the
# launcher, the preboot stage and the owner's policy use it (SEALVM_TPM): the
# root is a TPM quote. SEALVM_DEMO_TPM=0 uses the software root instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SEALVM_DEMO_TPM:-}" ]; then
    if command -v swtpm > /dev/null; then SEALVM_DEMO_TPM=1; else SEALVM_DEMO_TPM=0; fi
fi
SEALVM=".venv/bin/python -m sealvm.cli"
GUEST=guests/build/hello.elf
PORT=${SEALVM_DEMO_PORT:-8477}
WORK=$(mktemp -d /tmp/sealvm-demo.XXXXXX)
OWNER="$WORK/owner"
BROKER=
cleanup() {
    [ -n "$BROKER" ] && kill "$BROKER" 2>/dev/null || true
    [ "${SEALVM_DEMO_TPM:-0}" = 1 ] && .venv/bin/python -m sealvm.tools.swtpm stop "$WORK/tpm" >/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ "${SEALVM_DEMO_TPM:-0}" = 1 ]; then
    step "0. this host's TPM: a private swtpm on loopback"
    TPM_PORT=$(.venv/bin/python -c 'import sys; from sealvm.tools.swtpm import start_on_free_port
print(start_on_free_port(sys.argv[1]))' "$WORK/tpm")
    echo "swtpm listening on 127.0.0.1:$TPM_PORT"
    export SEALVM_TPM="127.0.0.1:$TPM_PORT"
fi

step "1. the owner creates their keys (Ed25519 signing, X25519 wrapping; 0600 files)"
$SEALVM owner init "$OWNER"

step "2. the owner signs the guest: image hash, command line, memory, devices"
$SEALVM owner sign --dir "$OWNER" "$GUEST" --name demo --cmdline "greeting=owner"

step "3. the host's launcher measures the core it will run; the owner trusts that"
MEASURE=$($SEALVM measure)
echo "$MEASURE"
HOST=$(echo "$MEASURE" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["host_pub"])')
CORE=$(echo "$MEASURE" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["core_measurement"])')
$SEALVM owner policy --dir "$OWNER" add host "$HOST" > /dev/null
if [ -n "${SEALVM_TPM:-}" ]; then
    TPM_AK=$(echo "$MEASURE" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["tpm_ak_pub"])')
    $SEALVM owner policy --dir "$OWNER" add tpm "$TPM_AK" > /dev/null
    $SEALVM owner policy --dir "$OWNER" require-tpm yes > /dev/null
fi
$SEALVM owner policy --dir "$OWNER" add core "$CORE"

step "4. the owner's key broker listens on 127.0.0.1:$PORT"
$SEALVM owner broker --dir "$OWNER" --port "$PORT" > "$WORK/broker.out" 2>&1 &
BROKER=$!
for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break
    sleep 0.1
done

step "5. sealvm run: measured core, attestation through the preboot stage, keys, guest"
$SEALVM run "$GUEST" --cmdline "greeting=owner" --manifest "$OWNER/vms/demo" \
    --broker "http://127.0.0.1:$PORT"

step "6. the same guest with a command line the owner did not sign is refused"
if $SEALVM run "$GUEST" --cmdline "greeting=intruder" --manifest "$OWNER/vms/demo" \
        --broker "http://127.0.0.1:$PORT"; then
    echo "UNEXPECTED: an unsigned command line ran" >&2
    exit 1
fi

step "the broker's log (one line per challenge, release or refusal)"
cut -c1-160 "$OWNER/broker.log"
