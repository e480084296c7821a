// The seam adapters on a real libtpms engine: Engine → SyncTransport (one reused buffer),
// SyncTransport → TpmTransport on this thread, the engine backend's factory (private copy,
// state dir). (A backend in a worker thread: test/tpmrm/rm-thread.test.ts.)
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { blockingTransport, engineTransport } from '../../drivers/tpm/adapters.ts';
import { parseResponse } from '../../drivers/tpm/command.ts';
import { MemoryStateStore } from '../../drivers/tpm/engine.ts';
import { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { createEngineBackend } from '../../drivers/libtpms/engine-backend.ts';
import { LibtpmsEngine } from '../../drivers/libtpms/libtpms-engine.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-adapters-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

t.test('engineTransport: responses in one reused buffer; close terminates the engine', async (t) => {
  const engine = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  const sync = engineTransport(engine);
  parseResponse(sync.transmitSync(tpm2.startup(), 0), '2.0');
  const a = sync.transmitSync(tpm2.getRandom(16), 0);
  const bytesA = a.slice();
  const b = sync.transmitSync(tpm2.getRandom(16), 0);
  t.equal(a.buffer, b.buffer, 'both responses are views of the same buffer');
  t.equal(tpm2.parseGetRandom(b).length, 16);
  t.notSame(a, bytesA, 'the earlier view now shows the later response (valid until the next call)');
  sync.close();
  t.throws(() => sync.transmitSync(tpm2.getRandom(8), 0), { code: 'ECLOSED' });
  // terminated: the shared library is free for another engine
  const again = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  again.terminate();
});

t.test('blockingTransport: a SyncTransport as a TpmTransport for a client', async (t) => {
  const tpm = blockingTransport(createEngineBackend({ version: '2.0' }));
  const c = new Tpm2Client(tpm);
  t.equal(await c.startup(), false, 'the engine backend came up started');
  const [r1, r2] = await Promise.all([c.getRandom(8), c.getRandom(8)]);
  t.equal(r1.length + r2.length, 16, 'two callers, each its own whole response');
  t.not(Buffer.from(r1).toString('hex'), Buffer.from(r2).toString('hex'), 'copies, not one reused view');
  await t.rejects(tpm.transmit(new Uint8Array(4)).then((r) => parseResponse(r, '2.0')), { code: 'ETPM' }, 'a TPM error is a response');
  await tpm.close();
});

t.test('engine backend: privateCopy beside a shared-library engine, NVRAM in stateDir, boot: false', async (t) => {
  const shared = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  t.teardown(() => shared.terminate());
  t.throws(() => createEngineBackend({ version: '2.0' }), { code: 'EENGINE' }, 'a second engine on the shared copy is refused');
  const stateDir = path.join(dir, 'nv');
  const chip = createEngineBackend({ version: '2.0', stateDir, privateCopy: true, boot: false });
  const rsp = chip.transmitSync(tpm2.getRandom(8), 0);
  t.equal(parseResponse(rsp, '2.0', false).rc, 0x100, 'not started: TPM_RC_INITIALIZE');
  parseResponse(chip.transmitSync(tpm2.startup(), 0), '2.0');
  chip.close();
  t.ok(fs.readdirSync(stateDir).length > 0, 'the private engine kept its NVRAM in stateDir');
});
