// The host's root key at a manager's start: unsealed from the hardware TPM, or made and
// sealed on a first start (host.ts).
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { VtpmError } from '../drivers/base/errors.ts';
import { readBounded } from '../drivers/host/state-dir.ts';
import type { HardwareTpm } from '../drivers/tpm/transport.ts';
import { createSealedRootKey, decodeSealedRootKey, DEFAULT_ROOT_KEY_PCRS, encodeSealedRootKey, pcrDifferences, unsealRootKey } from './hardware/root-key.ts';
import { instancesDir } from './store/blob-store.ts';
import { writeDurable } from './store/sealed-file.ts';

const ROOT_FILE = 'root.sealed';
const MAX_ROOT_FILE = 16 * 1024;

/** Unseal the host's root key, or create and seal one on a first start. A state dir that
 *  has a table but no sealed key is refused rather than given a new key that would make
 *  every instance unreadable. */
export async function rootKeyFor(hw: HardwareTpm, o: { stateDir: string; pcrs?: number[]; log: (line: string) => void }): Promise<{ rootKey: Uint8Array; pcrs: number[]; created: boolean }> {
  const file = join(o.stateDir, ROOT_FILE);
  const bytes = readBounded(file, MAX_ROOT_FILE, 'the sealed root key');
  if (bytes) {
    const sealed = decodeSealedRootKey(bytes);
    try {
      return { rootKey: await unsealRootKey(hw, sealed), pcrs: sealed.pcrs, created: false };
    } catch (e) {
      if ((e as VtpmError).code === 'EPCR') {
        const diff = await pcrDifferences(hw, sealed).catch(() => []);
        const which = diff.map((d) => d.pcr).join(',');
        throw new VtpmError('EPCR', `${(e as Error).message}${which ? ` (PCRs that changed: ${which})` : ''}`, { cause: e });
      }
      throw e;
    }
  }
  if (existsSync(join(o.stateDir, 'table')) || (existsSync(instancesDir(o.stateDir)) && readdirSync(instancesDir(o.stateDir)).length > 0)) {
    throw new VtpmError('ESTATE', `${o.stateDir} holds instances but no sealed root key (${ROOT_FILE}): refusing to make a new key that could not read them`);
  }
  const pcrs = o.pcrs ?? [...DEFAULT_ROOT_KEY_PCRS];
  const { rootKey, sealed } = await createSealedRootKey(hw, pcrs);
  writeDurable(file, encodeSealedRootKey(sealed), 'the sealed root key');
  o.log(`new root key sealed to the hardware TPM (PCRs ${pcrs.join(',') || 'none'})`);
  return { rootKey, pcrs, created: true };
}
