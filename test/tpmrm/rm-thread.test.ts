// A backend in its own worker thread (RmThread, what the fuse-native front end uses): errors
// keep their code and cause across the thread boundary; tpm0 commands go through; a TPM 2.0
// backend offers spaces, which can be turned off.
import t from 'tap';
import * as os from 'node:os';
import * as path from 'node:path';
import { engineBackendSpec } from '../../drivers/libtpms/engine-backend.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { RmThread } from '../../drivers/tpmrm/rm-thread.ts';

t.test('RmThread keeps the code and cause of a worker error', async (t) => {
  await t.rejects(RmThread.start({ module: path.join(os.tmpdir(), 'vtpm-missing-backend.ts'), export: 'x', params: null }), {
    code: 'EINVAL',
    message: /backend did not start: cannot import backend module/,
  });
  await t.rejects(RmThread.start(engineBackendSpec({ version: '3.0' as '2.0' })), { code: 'EINVAL', message: /params.version/ });
});

t.test('tpm0 commands through the thread; spaces only when asked for', async (t) => {
  const plain = await RmThread.start(engineBackendSpec({ version: '2.0' }), { tpmrm: false });
  t.equal(tpm2.parseGetRandom(await plain.transmit(tpm2.getRandom(8))).length, 8, 'GetRandom through the thread');
  t.equal(plain.tpmrm, false, 'tpmrm: false offers no spaces');
  await t.rejects(plain.openSpace(), { code: 'EINVAL' }, 'and refuses to open one');
  await plain.close();
  await t.rejects(plain.transmit(tpm2.getRandom(8)), { code: 'ECLOSED' }, 'a closed thread refuses commands');
});
