// The per-host manager (Xen's vtpmmgr, dom0's peer): one per host, long-lived. It unseals
// the host's root key from the hardware TPM, opens the instance table anchored by the
// hardware counter, and serves the control API on RUN/manager.sock.
//
//   node build/manager/daemon.js --state-dir D --run-dir R --hw tis:DIR|device:PATH [--pcrs 0,2,4,7]
//                                [--migration-listen ADDR:PORT] [--warm N]
//
// Readiness (drivers/host/daemon.ts): reports {pid, epoch, hardware} once the control API
// answers. SIGTERM/SIGINT or the `shutdown` operation: a clean stop (the table is written
// for the next epoch and the counter bumped), exit 0. A start that cannot unseal the root
// key (PCRs differ, another TPM) or whose table is rolled back or tampered with exits 1
// with the reason, and overwrites nothing.
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { describeError, VtpmError } from '../drivers/base/errors.ts';
import { reportFailure, reportReady } from '../drivers/host/daemon.ts';
import { accepting } from '../drivers/base/rpc.ts';
import { serveControl } from './control.ts';
import { parsePcrList } from './hardware/pcrs.ts';
import { Host } from './host.ts';
import { DEFAULT_WARM, MAX_WARM } from './control.ts';

function log(msg: string): void {
  console.error(`${new Date().toISOString()} manager: ${msg}`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { 'state-dir': { type: 'string' }, 'run-dir': { type: 'string' }, hw: { type: 'string' }, pcrs: { type: 'string' }, 'migration-listen': { type: 'string' }, warm: { type: 'string' } },
  });
  const stateDir = values['state-dir'];
  const runDir = values['run-dir'];
  const warm = values.warm === undefined ? undefined : Number(values.warm);
  if (!stateDir || !runDir || !values.hw || (warm !== undefined && !(Number.isInteger(warm) && warm >= 0 && warm <= MAX_WARM))) {
    throw new VtpmError('EINVAL', `usage: manager --state-dir D --run-dir R --hw tis:DIR|device:PATH [--pcrs 0,2,4,7] [--migration-listen ADDR:PORT] [--warm 0-${MAX_WARM}]`);
  }
  const sock = join(resolve(runDir), 'manager.sock');
  // Before the hardware and the table are touched: a second manager would move the epoch
  // under the running one.
  if (await accepting(sock)) throw new VtpmError('EBUSY', `a manager already serves ${sock}`);
  const host = await Host.open({
    stateDir: resolve(stateDir),
    runDir: resolve(runDir),
    hw: values.hw,
    pcrs: values.pcrs === undefined ? undefined : parsePcrList(values.pcrs),
    migrationListen: values['migration-listen'],
    warm: warm ?? DEFAULT_WARM,
    log,
  });
  const control = await serveControl(host, sock, log);
  host.onStopped((code) => {
    control.close();
    process.exit(code);
  });
  const st = host.status();
  log(`serving ${st.instances} instance(s), epoch ${st.epoch}, hardware: ${st.hardware}`);
  reportReady({ ok: true, info: { pid: process.pid, epoch: st.epoch, hardware: st.hardware } });
  process.on('SIGTERM', () => void host.stop('SIGTERM'));
  process.on('SIGINT', () => void host.stop('SIGINT'));
}

main().catch((e) => {
  log(describeError(e));
  reportFailure(e);
  process.exit(1);
});
