// The manager's rollback anchor: a TPM 2.0 NV monotonic counter (TPM_NT_COUNTER). The state
// store writes the counter's value into the table it seals; a table whose recorded value is
// below the counter is an old copy replayed (what Xen's vtpmmgr leaves as a TODO stub).
//
// A counter index can only go up: there is no NV_Write to it, and when a counter index is
// undefined and defined again its first increment starts it at the highest value any counter
// of the TPM ever had (Part 1, "NV Counters"), so deleting and re-creating it does not reset
// it either. What could be reset is an ordinary (or bits, extend) index someone defined at
// this handle beforehand; openCounter refuses any index here that is not exactly the counter
// it defines itself.
//
// A real TPM's NV wears out and rate-limits writes (some chips answer TPM_RC_NV_RATE for a
// while after a burst), so the manager bumps the counter once per host epoch (manager start,
// clean stop), never per guest command.
import { VtpmError } from '../../drivers/base/errors.ts';
import type { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { TPMA_NV, TPM_ALG, type NvPublic } from '../../drivers/tpm/tpm2-structures.ts';
import { type HardwareLike, hardwareClient, isTpmRc } from './client.ts';

/** The manager's counter index: owner range (TPM_HT_NV_INDEX 0x01, below 0x01400000 where
 *  the TCG reserves indices for the platform, EK certificates 0x01C0xxxx and more). */
export const MANAGER_COUNTER_INDEX = 0x01000100;

/** What nvDefineCounter defines: a counter, read and incremented with owner or (empty) index
 *  auth, no dictionary-attack lockout. TPMA_NV_WRITTEN is set by the first increment. */
export const COUNTER_ATTRIBUTES = TPMA_NV.COUNTER | TPMA_NV.OWNERWRITE | TPMA_NV.AUTHWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA;

const TPM_RC_HANDLE = 0x0b;
const NV_INDEX_LOW = 0x01000000;
const NV_INDEX_OWNER_END = 0x013fffff;

export interface MonotonicCounter {
  readonly index: number;
  /** Whether openCounter defined the index (first start of this manager on this TPM). */
  readonly created: boolean;
  read(): Promise<bigint>;
  /** Add one; resolves with the new value. */
  increment(): Promise<bigint>;
}

/** Open the manager's counter at `index`, defining it when it does not exist yet (and then
 *  incrementing it once, which is what makes a TPM counter readable). An index that exists
 *  but is not such a counter is refused with EPERM. */
export async function openCounter(hw: HardwareLike, index: number = MANAGER_COUNTER_INDEX): Promise<MonotonicCounter> {
  if (!Number.isInteger(index) || index < NV_INDEX_LOW || index > NV_INDEX_OWNER_END) {
    throw new VtpmError('EINVAL', `NV index 0x${index.toString(16)} is not in the owner range 0x01000000..0x013fffff`);
  }
  const c = await hardwareClient(hw);
  const hex = `0x${index.toString(16).padStart(8, '0')}`;
  let pub = await nvPublicOrUndefined(c, index);
  let created = false;
  if (!pub) {
    await c.nvDefineCounter(index);
    created = true;
    pub = (await c.nvEntity(index)).public;
  }
  checkCounter(pub, hex);
  // A counter reads TPM_RC_NV_UNINITIALIZED until its first increment.
  if ((pub.attributes & TPMA_NV.WRITTEN) === 0) await c.nvIncrement(index);
  return {
    index,
    created,
    read: () => c.nvReadCounter(index),
    async increment() {
      await c.nvIncrement(index);
      return c.nvReadCounter(index);
    },
  };
}

function checkCounter(pub: NvPublic, hex: string): void {
  const attrs = pub.attributes & ~TPMA_NV.WRITTEN;
  const problems: string[] = [];
  if (attrs !== COUNTER_ATTRIBUTES) problems.push(`attributes 0x${attrs.toString(16)} (a monotonic counter defined by the manager has 0x${COUNTER_ATTRIBUTES.toString(16)})`);
  if (pub.dataSize !== 8) problems.push(`size ${pub.dataSize} (a counter is 8 bytes)`);
  if (pub.nameAlg !== TPM_ALG.SHA256) problems.push(`name algorithm 0x${pub.nameAlg.toString(16)}`);
  if (pub.authPolicy.length !== 0) problems.push('an authorisation policy');
  if (problems.length > 0) {
    throw new VtpmError(
      'EPERM',
      `NV index ${hex} exists but is not the manager's monotonic counter (${problems.join('; ')}): something defined it beforehand, possibly to be able to reset it. ` +
        'Refusing to use it as the rollback anchor; remove it (tpm2_nvundefine) or choose another index.',
    );
  }
}

async function nvPublicOrUndefined(c: Tpm2Client, index: number): Promise<NvPublic | undefined> {
  try {
    return (await c.nvEntity(index)).public;
  } catch (e) {
    if (isTpmRc(e, TPM_RC_HANDLE)) return undefined;
    throw e;
  }
}
