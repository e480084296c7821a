// Bringing a TPM up the way the kernel does at boot, for whoever owns an Engine.
import { VtpmError } from '../base/errors.ts';
import { parseHeader } from './command.ts';
import type { Engine } from './engine.ts';
import { TPM_RC_INITIALIZE } from './rc.ts';
import * as tpm12 from './tpm12.ts';
import * as tpm2 from './tpm2.ts';

const TPM_INVALID_POSTINIT = 0x26;

/** Startup(CLEAR), then optionally a self test: a device node is never handed out
 *  un-started, since tpm2-tss and tcsd do not send Startup themselves. A TPM already
 *  started (resumed volatile state) answers TPM_RC_INITIALIZE / TPM_INVALID_POSTINIT,
 *  which is fine. */
export function bootTpm(e: Engine, opts: { selfTest: boolean }): void {
  const already = e.version === '2.0' ? TPM_RC_INITIALIZE : TPM_INVALID_POSTINIT;
  const run = (cmd: Uint8Array, what: string, tolerate?: number) => {
    const rc = parseHeader(e.process(cmd), `${what} response`).code;
    if (rc !== 0 && rc !== tolerate) throw new VtpmError('ETPM', `TPM ${what} failed with rc 0x${rc.toString(16)}`);
  };
  run(e.version === '2.0' ? tpm2.startup() : tpm12.startup(), 'Startup', already);
  if (opts.selfTest) run(e.version === '2.0' ? tpm2.selfTest(true) : tpm12.continueSelfTest(), 'self test');
}
