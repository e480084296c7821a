// PCR helpers on the emulated hardware TPM: extend is SHA-256(old || digest), reads of more
// PCRs than one PCR_Read returns, argument checks.
import t from 'tap';
import * as path from 'node:path';
import { TPM_ALG, hash } from '../../drivers/tpm/tpm2-structures.ts';
import { extendPcr, readPcrs } from '../../manager/hardware/pcrs.ts';
import { loadedHandles, openChip, tempDir } from './hw-chip.ts';

t.test('extend and read the SHA-256 bank', async (t) => {
  const hw = await openChip(path.join(tempDir(t, 'vtpm-hw-pcrs-'), 'chip'));
  t.teardown(() => hw.close());
  const all = await readPcrs(hw, Array.from({ length: 24 }, (_, i) => 23 - i));
  t.same([...all.keys()], Array.from({ length: 24 }, (_, i) => i), 'all 24, in order (several PCR_Reads)');
  t.same(all.get(0), new Uint8Array(32), 'PCR 0 is zero after Startup(CLEAR)');
  const m = hash(TPM_ALG.SHA256, new Uint8Array(Buffer.from('vtpmd image')));
  await extendPcr(hw, 10, m);
  const now = await readPcrs(hw, [10, 10]);
  t.same([...now.keys()], [10], 'duplicates read once');
  t.same(now.get(10), hash(TPM_ALG.SHA256, all.get(10)!, m), 'PCR 10 = SHA-256(old || measurement)');
  await t.rejects(extendPcr(hw, 10, new Uint8Array(20)), { code: 'EINVAL', message: /32 bytes, not 20/ });
  await t.rejects(extendPcr(hw, 24, m), { code: 'EINVAL', message: /PCR 24/ });
  await t.rejects(readPcrs(hw, [-1]), { code: 'EINVAL' });
  t.same(await readPcrs(hw, []), new Map(), 'no PCRs, no read');
  t.same(await loadedHandles(hw), [], 'nothing left loaded');
});
