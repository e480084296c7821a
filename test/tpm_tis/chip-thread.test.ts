// The chip thread serves whatever SyncTransport its spec names, and a worker that cannot
// build it fails with the worker's own code and cause, not a string.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { engineBackendSpec } from '../../drivers/libtpms/engine-backend.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { ChipThread } from '../../drivers/tpm_tis/chip-thread.ts';
import { openEmulatedTis } from '../../drivers/tpm_tis/emulated.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-chip-thread-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

t.test('a worker error keeps its code and cause', async (t) => {
  const err = await ChipThread.start({ transport: { module: path.join(dir, 'missing.ts'), export: 'x', params: null } }).then(
    () => t.fail('started') as never,
    (e: unknown) => e as Error & { code: string },
  );
  t.equal(err.code, 'EINVAL');
  t.match(err.message, /chip worker failed to start: cannot import backend module/);
  t.ok(err.cause, 'the import failure is kept as the cause');
  await t.rejects(ChipThread.start({ transport: engineBackendSpec({ version: '9' as '2.0' }) }), { code: 'EINVAL', message: /params.version/ });
});

t.test('any SyncTransport behind the registers: a TPM 2.0 engine backend (booted, shared library)', async (t) => {
  const tis = await openEmulatedTis({ transport: engineBackendSpec({ version: '2.0' }), description: 'TIS over an engine backend' });
  t.equal(tis.description, 'TIS over an engine backend');
  t.equal(tpm2.parseGetRandom(await tis.transmit(tpm2.getRandom(12))).length, 12, 'started by the backend, so commands run at once');
  await tis.close();
});
