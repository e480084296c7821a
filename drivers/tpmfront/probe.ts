// A driver's probe of a served node: one GetRandom through it answers (the toolstack and the
// manager wait for this before they hand a node out).
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { VtpmError } from '../base/errors.ts';
import type { TpmVersion } from '../tpm/engine.ts';
import * as tpm12 from '../tpm/tpm12.ts';
import * as tpm2 from '../tpm/tpm2.ts';

/** Throws unless a GetRandom written to `node` comes back as a successful response. */
export function probeNode(node: string, tpm: TpmVersion): void {
  const fd = openSync(node, 'r+');
  try {
    const cmd = tpm === '2.0' ? tpm2.getRandom(8) : tpm12.getRandom(8);
    writeSync(fd, cmd);
    const rsp = Buffer.alloc(4096);
    const n = readSync(fd, rsp, 0, rsp.length, null);
    if (tpm === '2.0') tpm2.parseGetRandom(rsp.subarray(0, n));
    else tpm12.parseGetRandom(rsp.subarray(0, n));
  } finally {
    closeSync(fd);
  }
}

/** Probe until the node answers, for up to `timeoutMs`; `dead()` names a piece that died
 *  meanwhile (then waiting longer is pointless). */
export async function waitNodeAnswers(node: string, tpm: TpmVersion, timeoutMs: number, dead: () => string | undefined): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    const why = dead();
    if (why) throw new VtpmError('EIO', why, last === undefined ? undefined : { cause: last });
    try {
      probeNode(node, tpm);
      return;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new VtpmError('ETIMEDOUT', `node ${node} did not answer within ${timeoutMs} ms`, { cause: last });
}
