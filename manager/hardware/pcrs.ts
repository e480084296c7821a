// PCR helpers on the hardware TPM's SHA-256 bank, for the root key's PCR binding and, later,
// the manager's measured launch. Thin over Tpm2Client; only the SHA-256 bank is used.
import { VtpmError } from '../../drivers/base/errors.ts';
import { TPM_ALG_SHA256, type PcrSelection } from '../../drivers/tpm/tpm2.ts';
import { type HardwareLike, hardwareClient } from './client.ts';

export const PCR_COUNT = 24;
export const SHA256_SIZE = 32;

/** Sorted, de-duplicated PCR indices, each checked to be in 0..23. */
export function normalisePcrs(indices: readonly number[]): number[] {
  for (const i of indices) {
    if (!Number.isInteger(i) || i < 0 || i >= PCR_COUNT) throw new VtpmError('EINVAL', `PCR ${String(i)} is not in 0..${PCR_COUNT - 1}`);
  }
  return [...new Set(indices)].sort((a, b) => a - b);
}

/** "0,2,4,7" → [0, 2, 4, 7]; "" → [] (no PCR binding). The CLI checks --pcrs with this too. */
export function parsePcrList(s: string): number[] {
  if (s.trim() === '') return [];
  const parts = s.split(',').map((p) => p.trim());
  if (parts.some((p) => !/^\d{1,2}$/.test(p))) throw new VtpmError('EINVAL', `--pcrs ${JSON.stringify(s)}: a comma-separated list of PCR numbers, e.g. 0,2,4,7`);
  return normalisePcrs(parts.map(Number));
}

export function sha256Selection(pcrs: readonly number[]): PcrSelection[] {
  return [{ alg: TPM_ALG_SHA256, pcrs: [...pcrs] }];
}

/** TPM2_PCR_Extend of one SHA-256 digest into PCR `index` (locality 0, empty PCR auth). */
export async function extendPcr(hw: HardwareLike, index: number, sha256Digest: Uint8Array): Promise<void> {
  const [pcr] = normalisePcrs([index]);
  if (sha256Digest.length !== SHA256_SIZE) throw new VtpmError('EINVAL', `a SHA-256 digest is ${SHA256_SIZE} bytes, not ${sha256Digest.length}`);
  const c = await hardwareClient(hw);
  await c.pcrExtend(pcr!, [{ alg: TPM_ALG_SHA256, digest: sha256Digest }]);
}

/** The current SHA-256 values of `indices` (sorted, de-duplicated), index → 32 bytes. A TPM
 *  returns at most 8 digests per PCR_Read, so this reads until every PCR asked came back. */
export async function readPcrs(hw: HardwareLike, indices: readonly number[]): Promise<Map<number, Uint8Array>> {
  const want = normalisePcrs(indices);
  const c = await hardwareClient(hw);
  const out = new Map<number, Uint8Array>();
  while (out.size < want.length) {
    const missing = want.filter((p) => !out.has(p));
    const res = await c.pcrRead(sha256Selection(missing));
    const got = res.selection.find((s) => s.alg === TPM_ALG_SHA256)?.pcrs ?? [];
    const fresh = got.filter((p) => missing.includes(p));
    if (fresh.length === 0 || res.digests.length !== got.length) {
      throw new VtpmError('EPROTO', `the hardware TPM returned no SHA-256 values for PCRs ${missing.join(',')} (is the SHA-256 bank allocated?)`);
    }
    got.forEach((p, i) => {
      const d = res.digests[i]!;
      if (d.length !== SHA256_SIZE) throw new VtpmError('EPROTO', `PCR ${p} value of ${d.length} bytes in the SHA-256 bank`);
      if (missing.includes(p)) out.set(p, d);
    });
  }
  return new Map(want.map((p) => [p, out.get(p)!]));
}
