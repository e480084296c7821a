// A standalone control-channel server (tests, trying QEMU by hand): libtpms with plain blob
// files in --state (in memory without it), a control socket QEMU or swtpm_ioctl connects to.
//
//   tsx drivers/swtpm_ctrl/serve-main.ts --tpm 2.0 --ctrl /run/vtpm/g1.ctrl [--server PATH]
//       [--state DIR] [--not-need-init] [--startup-clear] [--terminate] [--device tpm-crb] [-v]
//       [--hooks MODULE#EXPORT [--hooks-params JSON]]   (a HooksFactory, see worker.ts)
//
// Prints one JSON line on stdout once the socket listens: {"ok":true,"ctrl":...,"qemu":[...]}
// (qemu: the arguments to give QEMU), or {"ok":false,"error":...}. Exits 0 after CMD_SHUTDOWN,
// SIGTERM or SIGINT (the TPM powered off orderly first).
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { describeError, VtpmError } from '../base/errors.ts';
import { qemuTpmArgs, type TpmDevice } from './qemu-args.ts';
import { startCtrlWorker } from './thread.ts';
import type { HooksSpec } from './worker.ts';

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      tpm: { type: 'string', default: '2.0' },
      ctrl: { type: 'string' },
      server: { type: 'string' },
      state: { type: 'string' },
      'not-need-init': { type: 'boolean', default: false },
      'startup-clear': { type: 'boolean', default: false },
      terminate: { type: 'boolean', default: false },
      device: { type: 'string', default: 'tpm-tis' },
      verbose: { type: 'boolean', short: 'v', default: false },
      hooks: { type: 'string' },
      'hooks-params': { type: 'string' },
    },
  });
  const version = values.tpm;
  if ((version !== '1.2' && version !== '2.0') || !values.ctrl || (values.device !== 'tpm-tis' && values.device !== 'tpm-crb')) {
    throw new VtpmError('EINVAL', 'usage: serve-main --tpm 1.2|2.0 --ctrl PATH [--server PATH] [--state DIR] [--not-need-init] [--startup-clear] [--terminate] [--device tpm-tis|tpm-crb] [-v]');
  }
  const ctrlPath = resolve(values.ctrl);
  let hooks: HooksSpec | undefined;
  if (values.hooks) {
    const at = values.hooks.lastIndexOf('#');
    if (at < 1) throw new VtpmError('EINVAL', '--hooks wants MODULE#EXPORT');
    hooks = { module: resolve(values.hooks.slice(0, at)), export: values.hooks.slice(at + 1), params: values['hooks-params'] ? JSON.parse(values['hooks-params']) : undefined };
  }
  const w = await startCtrlWorker({
    version,
    ctrlPath,
    stateDir: values.state ? resolve(values.state) : undefined,
    data: values.server ? { listenPath: resolve(values.server) } : undefined,
    notNeedInit: values['not-need-init'],
    startupClear: values['startup-clear'],
    terminateOnHup: values.terminate,
    verbose: values.verbose,
    hooks,
  });
  process.stdout.write(JSON.stringify({ ok: true, ctrl: ctrlPath, pid: process.pid, qemu: qemuTpmArgs({ ctrlPath, device: values.device as TpmDevice }) }) + '\n');
  const stop = () => void w.stop().then(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  const why = await w.ended;
  process.stderr.write(`swtpm-ctrl: serving ended (${why})\n`);
  await w.stop();
  process.exit(0);
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ ok: false, error: describeError(e) }) + '\n');
  process.exit(1);
});
