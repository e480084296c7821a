// Register-level overhead of the emulated hardware TPM: TPM2_GetRandom and TPM2_PCR_Read
// through the TIS driver + register model + chip worker, beside the same libtpms engine
// called directly in this thread, same run. Target: ≤ 1.3× the direct engine.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { MemoryStateStore } from '../../drivers/tpm/engine.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { openEmulatedTpm } from '../../drivers/hwtpm/open.ts';
import { LibtpmsEngine } from '../../drivers/libtpms/libtpms-engine.ts';
import { type Row, printTable, stats } from './lib.ts';

const N = Number(process.env.HWTPM_N ?? 20_000);

export async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-bench-hwtpm-'));
  const cmds = {
    'TPM2_GetRandom(16)': tpm2.getRandom(16),
    'TPM2_PCR_Read(sha256: 0-7)': tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [0, 1, 2, 3, 4, 5, 6, 7] }]),
  };
  // The chip worker runs a private copy of libtpms, so this engine may use the shared one.
  const direct = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  const tis = await openEmulatedTpm({ stateDir: path.join(dir, 'chip') });
  try {
    direct.process(tpm2.startup());
    await tis.transmit(tpm2.startup());
    const rows: Row[] = [];
    for (const [what, cmd] of Object.entries(cmds)) {
      // Interleaved, one of each per turn, so both see the same machine load.
      const a = new Float64Array(N);
      const b = new Float64Array(N);
      for (let i = -2000; i < N; i++) {
        const t0 = process.hrtime.bigint();
        direct.process(cmd);
        const t1 = process.hrtime.bigint();
        await tis.transmit(cmd);
        const t2 = process.hrtime.bigint();
        if (i >= 0) {
          b[i] = Number(t1 - t0) / 1000;
          a[i] = Number(t2 - t1) / 1000;
        }
      }
      rows.push({ what, ours: stats(a), base: stats(b), baseName: 'libtpms engine, direct call', target: 1.3 });
    }
    printTable(`hwtpm: TIS driver + register model + chip worker vs direct engine (n=${N})`, rows);
  } finally {
    await tis.close();
    direct.terminate();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.url === `file://${process.argv[1]}`) await main();
