#!/usr/bin/env bash
# The main job: a host's manager (root key sealed to the emulated hardware TPM, the instance
# table), two guests' instances (TPM 2.0 and TPM 1.2) with mounted tpm0 nodes, and real TPM
# clients talking to them: tpm2-tools to the first, tpm-tools through the trousers daemon
# (seeing the guest's node as /dev/tpm0) to the second. Then the host restarts and the
# state is still there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
vtpm() { ./scripts/vtpm.sh "$@"; }
DIR=${VTPM_DEMO_DIR:-/run/vtpm-demo}
work=$(mktemp -d /tmp/vtpm-demo.XXXXXX)
mgr=(--run-dir "$DIR")
tcsd_pid=""
cleanup() {
  [ -n "$tcsd_pid" ] && kill -- "-$tcsd_pid" 2>/dev/null || true
  vtpm host stop "${mgr[@]}" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
vtpm host stop "${mgr[@]}" >/dev/null 2>&1 || true

echo "== libtpms on this host"
vtpm engine selftest

echo; echo "== the host's manager: root key sealed to the (emulated) hardware TPM, instance table"
vtpm host start "${mgr[@]}" --state-dir "$work/state" --hw "tis:$work/hwtpm"
vtpm create web --tpm 2.0 "${mgr[@]}"
vtpm create legacy --tpm 1.2 "${mgr[@]}"

echo; echo "== guest 'web' with a TPM 2.0, through tpm2-tools"
node=$(vtpm start web "${mgr[@]}")
echo "node: $node"
echo "tpm2_getrandom 16: $(tpm2_getrandom -T "device:$node" --hex 16)"
tpm2_pcrextend -T "device:$node" "16:sha256=$(printf 'hello from the guest' | sha256sum | cut -d' ' -f1)"
tpm2_pcrread -T "device:$node" sha256:16
tpm2_getcap -T "device:$node" properties-fixed | grep -A2 -E 'TPM2_PT_MANUFACTURER|TPM2_PT_FAMILY_INDICATOR' | grep -E 'TPM2_PT|value'
printf 'kept by the manager' > "$work/nv.in"
tpm2_nvdefine -T "device:$node" 0x1500016 -C o -s 19 -a 'ownerread|ownerwrite|authread|authwrite'
tpm2_nvwrite -T "device:$node" 0x1500016 -C o -i "$work/nv.in"
echo "NV 0x1500016: $(tpm2_nvread -T "device:$node" 0x1500016 -C o -s 19)"

echo; echo "== guest 'legacy' with a TPM 1.2, through tcsd + tpm-tools"
echo "node: $(vtpm start legacy "${mgr[@]}")"
chown tss:tss "$work"; chmod 0700 "$work"
printf 'port = 30003\nsystem_ps_file = %s/system.data\n' "$work" > "$work/tcsd.conf"
chown root:tss "$work/tcsd.conf"; chmod 0640 "$work/tcsd.conf"
# In its own session, so stopping it reaches tcsd through the CLI and namespace wrappers.
setsid ./scripts/vtpm.sh exec legacy "${mgr[@]}" -- tcsd -f -c "$work/tcsd.conf" > "$work/tcsd.log" 2>&1 &
tcsd_pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/30003) 2>/dev/null && break; sleep 0.1; done
TSS_TCSD_PORT=30003 tpm_version
kill -- "-$tcsd_pid"; wait "$tcsd_pid" 2>/dev/null || true; tcsd_pid=""

echo; echo "== the host's instances"
vtpm list "${mgr[@]}"

echo; echo "== host restart: every instance stopped (orderly), the table written for the next epoch"
vtpm host stop "${mgr[@]}"
vtpm host start "${mgr[@]}" --state-dir "$work/state" --hw "tis:$work/hwtpm"
echo "after the restart:"; vtpm list "${mgr[@]}"
node=$(vtpm start web "${mgr[@]}")
echo "NV 0x1500016 after the restart: $(tpm2_nvread -T "device:$node" 0x1500016 -C o -s 19)"
vtpm host status "${mgr[@]}"
vtpm stop web "${mgr[@]}"
vtpm host stop "${mgr[@]}"
