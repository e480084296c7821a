// Bringing a TPM up the way the kernel does at boot, for whoever owns an Engine.
import { VtpmError } from '../base/errors.ts';
import { parseHeader } from './command.ts';
import type { Engine } from './engine.ts';
import { rcName, TPM_RC_INITIALIZE } from './rc.ts';
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

/** What a platform sends before it takes power from the TPM: TPM2_Shutdown(STATE) for
 *  TPM 2.0, TPM_SaveState for TPM 1.2. Without it the next start is a non-orderly one,
 *  which a TPM 2.0 counts as a dictionary-attack failure (three such starts and the
 *  guest's DA-protected keys are locked out). libtpms writes the shutdown state through
 *  its NVRAM callbacks (the engine's StateStore) while the command runs: TPM 2.0 in the
 *  "permall" blob (orderlyState = TPM_SU_STATE), TPM 1.2 as the "savestate" blob, which
 *  the next Startup(CLEAR) deletes again. Shutdown(STATE) is refused when the PCR banks
 *  were reallocated (the change needs a TPM Reset): then Shutdown(CLEAR), equally orderly.
 *  Must be the last command before terminate(): a later command may undo the orderly
 *  state. Throws VtpmError('ETPM') naming the response code. */
export function shutdownTpm(e: Engine): void {
  const rcOf = (cmd: Uint8Array, what: string) => parseHeader(e.process(cmd), `${what} response`).code;
  const fail = (what: string, rc: number, also = '') =>
    new VtpmError('ETPM', `TPM ${what} failed: ${rcName(rc, e.version)} (0x${rc.toString(16)})${also}`);
  if (e.version === '1.2') {
    const rc = rcOf(tpm12.saveState(), 'SaveState');
    if (rc !== 0) throw fail('SaveState', rc);
    return;
  }
  const rc = rcOf(tpm2.shutdown(tpm2.TPM_SU_STATE), 'Shutdown(STATE)');
  if (rc === 0) return;
  const clear = rcOf(tpm2.shutdown(tpm2.TPM_SU_CLEAR), 'Shutdown(CLEAR)');
  if (clear !== 0) throw fail('Shutdown(STATE)', rc, `, and Shutdown(CLEAR): ${rcName(clear, e.version)} (0x${clear.toString(16)})`);
}
