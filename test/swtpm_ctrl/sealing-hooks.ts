// Test hooks standing in for the manager: every exported blob is sealed with AES-256-GCM
// under the owner's key (whatever the client asked for), an imported one must open under
// it, bound to its blob type.
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { VtpmError } from '../../drivers/base/errors.ts';
import type { CtrlHooks } from '../../drivers/swtpm_ctrl/controller.ts';
import { PTM_CONFIG_FLAG_MIGRATION_KEY } from '../../drivers/swtpm_ctrl/protocol.ts';
import type { HooksFactory } from '../../drivers/swtpm_ctrl/worker.ts';

const MAGIC = Buffer.from('VTPMSEAL');

export const sealingHooks: HooksFactory = (params) => {
  const key = Buffer.from((params as { key: string }).key, 'hex');
  if (key.length !== 32) throw new VtpmError('EINVAL', 'sealing hooks need a 32-byte hex key');
  const hooks: CtrlHooks = {
    exportBlob(type, plain) {
      const iv = randomBytes(12);
      const c = createCipheriv('aes-256-gcm', key, iv);
      c.setAAD(Buffer.from(type));
      const body = Buffer.concat([c.update(plain), c.final()]);
      return { data: Buffer.concat([MAGIC, iv, c.getAuthTag(), body]), encrypted: true };
    },
    importBlob(type, data) {
      const b = Buffer.from(data);
      if (b.length < 36 || !b.subarray(0, 8).equals(MAGIC)) throw new VtpmError('EINTEGRITY', 'not a sealed blob');
      const d = createDecipheriv('aes-256-gcm', key, b.subarray(8, 20));
      d.setAAD(Buffer.from(type));
      d.setAuthTag(b.subarray(20, 36));
      return Buffer.concat([d.update(b.subarray(36)), d.final()]);
    },
    configFlags: () => PTM_CONFIG_FLAG_MIGRATION_KEY,
  };
  return hooks;
};
