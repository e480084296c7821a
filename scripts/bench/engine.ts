// Engine benchmark: TPM2_GetRandom(16) and TPM2_PCR_Extend in-process through libtpms,
// beside the same bytes sent to `swtpm socket --tpm2` over TCP, in the same run.
// Target: in-process ≤ 0.5× swtpm (no socket hop).
import { createHash } from 'node:crypto';
import { MemoryStateStore } from '../../drivers/tpm/engine.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { LibtpmsEngine } from '../../drivers/libtpms/libtpms-engine.ts';
import { isMain, printTable, Swtpm, timeAsync, timeSync } from './lib.ts';

const N = 10_000;

export async function main(): Promise<void> {
  const getRandom = tpm2.getRandom(16);
  const extend = tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest: createHash('sha256').update('bench').digest() }]);
  const engine = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  const swtpm = await Swtpm.start('2.0');
  try {
    engine.process(tpm2.startup());
    const out = new Uint8Array(4096);
    const ourRand = timeSync(N, () => engine.processInto(getRandom, out));
    const ourExt = timeSync(N, () => engine.processInto(extend, out));
    const c = await swtpm.client();
    const swRand = await timeAsync(N, () => c.transmit(getRandom));
    const swExt = await timeAsync(N, () => c.transmit(extend));
    c.close();
    printTable(`engine: in-process libtpms vs swtpm over TCP (${N} commands each)`, [
      { what: 'TPM2_GetRandom(16)', ours: ourRand, base: swRand, baseName: 'swtpm TCP', target: 0.5 },
      { what: 'TPM2_PCR_Extend', ours: ourExt, base: swExt, baseName: 'swtpm TCP', target: 0.5 },
    ]);
  } finally {
    engine.terminate();
    await swtpm.stop();
  }
}

if (isMain(import.meta.url)) await main();
