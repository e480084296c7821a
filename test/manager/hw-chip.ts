// Test support for manager/hardware: the emulated hardware TPM (TIS driver over the model
// over libtpms in a worker) with its NVRAM in a directory, and what it still has loaded.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { openHardware } from '../../drivers/hwtpm/open.ts';
import { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { TPM_CAP_HANDLES } from '../../drivers/tpm/tpm2.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';

/** A host's emulated chip: a fresh worker on the NVRAM in `stateDir` (a new "boot" each time). */
export async function openChip(stateDir: string): Promise<HardwareTpm> {
  return openHardware(`tis:${stateDir}`);
}

export function tempDir(t: { teardown(fn: () => void): void }, prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Transient objects (0x80xxxxxx), loaded HMAC (0x02xxxxxx) and policy (0x03xxxxxx) sessions. */
export async function loadedHandles(hw: HardwareTpm): Promise<number[]> {
  const c = new Tpm2Client(hw);
  const out: number[] = [];
  for (const first of [0x80000000, 0x02000000, 0x03000000]) {
    const cap = await c.getCapability(TPM_CAP_HANDLES, first, 64);
    out.push(...(cap.list ?? []).filter((h) => h >>> 24 === first >>> 24));
  }
  return out;
}

/** Median of `n` timed runs of `fn`, in milliseconds. */
export async function medianMs(n: number, fn: () => Promise<unknown>): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await fn();
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  times.sort((a, b) => a - b);
  return n % 2 ? times[(n - 1) / 2]! : (times[n / 2 - 1]! + times[n / 2]!) / 2;
}
