// The tpmrm0 scenario suite, run against each front end (rm-raw.test.ts, rm-native.test.ts)
// through a real mount with the libtpms engine backend: many openers, each its own handle
// space; two clients signing at once with their own HMAC sessions; what a client leaves
// behind; bad input; tpm0 beside tpmrm0. Node's async fs is the client (the front end never
// serves on a thread these calls block).
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { open, readdir, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { Test } from 'tap';
import { buildCommand } from '../../drivers/tpm/command.ts';
import { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { TPM_SE } from '../../drivers/tpm/tpm2-session.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import type { HardwareTpm, TransportSpec } from '../../drivers/tpm/transport.ts';
import type { TpmNode } from '../../drivers/tpmfront/mount.ts';
import { mountKind, type KindNode, type NodeKind } from './node-kinds.ts';
import { rcOf, roundTrip } from './node-scenarios.ts';
import { contextSaveCommand, flushCommand, LOADED_SESSION, SAVED_SESSION, signCommand, signingKey, signVerifies, TRANSIENT } from '../tpmrm/support.ts';

const run = promisify(execFile);
const GETRANDOM = Buffer.from(tpm2.getRandom(16));


/** An open node file as a HardwareTpm, for Tpm2Client. */
function fileTpm(fh: FileHandle, what: string): HardwareTpm {
  return {
    description: what,
    transmit: async (cmd) => new Uint8Array(await roundTrip(fh, cmd)),
    close: () => fh.close(),
  };
}

async function handles(fh: FileHandle, first: number): Promise<number[]> {
  return tpm2.parseGetCapability(new Uint8Array(await roundTrip(fh, tpm2.getCapability(tpm2.TPM_CAP_HANDLES, first, 64)))).list ?? [];
}

/** `backend`: for raw/native (default the libtpms engine); a frontd node's is its vtpmd. */
export function rmScenarios(t: Test, kind: NodeKind, backend?: TransportSpec): void {
  const dir = mkdtempSync(join(tmpdir(), `vtpm-tpmrm-${kind}-`));
  let node!: TpmNode;
  let rm!: string;
  let mounted: KindNode | undefined;
  t.before(async () => {
    mounted = await mountKind(kind, dir, { backend });
    node = mounted.node;
    rm = node.rmPath!;
  });
  t.teardown(async () => {
    await mounted?.cleanup();
    rmSync(dir, { recursive: true, force: true });
  });

  /** What the TPM holds, asked through tpm0 (no space filters it). */
  const tpmHolds = async () => {
    const fh = await open(node.path, 'r+');
    try {
      return { transient: await handles(fh, TRANSIENT), loaded: await handles(fh, LOADED_SESSION), saved: await handles(fh, SAVED_SESSION) };
    } finally {
      await fh.close();
    }
  };
  const NOTHING = { transient: [], loaded: [], saved: [] };

  t.test('tpmrm0 sits beside tpm0, mode 0600', async (t) => {
    t.equal(rm, join(node.dir, 'tpmrm0'));
    t.same((await readdir(node.dir)).sort(), ['tpm0', 'tpmrm0']); // async: native serves on this thread
    const r = await run('ls', ['-l', node.dir]);
    t.match(r.stdout, /^-rw------- 1 root root 0 .* tpmrm0$/m);
  });

  t.test('many openers at once, each answered; tpm0 held open does not stop them', async (t) => {
    const tpm0 = await open(node.path, 'r+');
    t.teardown(() => tpm0.close());
    const files = await Promise.all(Array.from({ length: 8 }, () => open(rm, 'r+')));
    t.teardown(() => Promise.all(files.map((f) => f.close())));
    const rsps = await Promise.all(files.map((f) => roundTrip(f)));
    t.same(rsps.map(rcOf), Array(8).fill(0), 'eight tpmrm0 files answered');
    t.equal(rcOf(await roundTrip(tpm0)), 0, 'tpm0 answers meanwhile');
    await t.rejects(open(node.path, 'r+'), { code: 'EBUSY' }, 'a second tpm0 opener is still refused');
  });

  t.test('two clients at once, each a primary key and its own HMAC session, signing in a loop', async (t) => {
    const loop = async (who: string) => {
      const fh = await open(rm, 'r+');
      const c = new Tpm2Client(fileTpm(fh, who));
      try {
        const session = await c.startAuthSession({ type: TPM_SE.HMAC, symmetric: false });
        const key = await signingKey(c, session);
        let good = 0;
        for (let i = 0; i < 25; i++) if (await signVerifies(c, key, randomBytes(64), session)) good++;
        return { key: key.handle, session: session.handle, good };
      } finally {
        await fh.close();
      }
    };
    const [a, b] = await Promise.all([loop('A'), loop('B')]);
    t.equal(a.key, 0x80ffffff, 'A\'s key is 0x80ffffff in its space');
    t.equal(b.key, 0x80ffffff, 'so is B\'s in its own');
    t.not(a.session, b.session, 'sessions are distinct');
    t.equal(a.good, 25, 'every signature of A verifies');
    t.equal(b.good, 25, 'every signature of B verifies');
  });

  t.test('a client that closes without flushing leaves nothing behind', async (t) => {
    const fh = await open(rm, 'r+');
    const c = new Tpm2Client(fileTpm(fh, 'leaver'));
    const s = await c.startAuthSession({ type: TPM_SE.HMAC, symmetric: false });
    await signingKey(c, s);
    await signingKey(c);
    t.same(await handles(fh, TRANSIENT), [0x80ffffff, 0x80fffffe], 'its space lists its two objects');
    t.ok((await tpmHolds()).saved.includes(s.handle), 'its session is saved in the TPM meanwhile');
    await fh.close();
    let left = await tpmHolds();
    for (let i = 0; i < 20 && left.saved.length > 0; i++) {
      await new Promise((r) => setTimeout(r, 25)); // the kernel delivers RELEASE after close() returns
      left = await tpmHolds();
    }
    t.same(left, NOTHING, 'no object, no session left in the TPM');
    const tool = await run('tpm2_getcap', ['-T', `device:${rm}`, 'handles-transient']);
    t.equal(tool.stdout.trim(), '', 'tpm2_getcap handles-transient from a fresh opener shows none');
  });

  t.test('bad input gets errnos and TPM errors, never another space\'s objects', async (t) => {
    const a = await open(rm, 'r+');
    const b = await open(rm, 'r+');
    t.teardown(() => Promise.all([a.close(), b.close()]));
    const ca = new Tpm2Client(fileTpm(a, 'A'));
    const key = await signingKey(ca);
    await t.rejects(b.write(signCommand(key.handle)), { code: 'EINVAL' }, 'B naming A\'s handle: EINVAL');
    await t.rejects(b.write(flushCommand(key.handle)), { code: 'EINVAL' }, 'B flushing it: EINVAL');
    await t.rejects(b.write(contextSaveCommand(key.handle)), { code: 'EINVAL' }, 'B saving it: EINVAL');
    await t.rejects(b.write(signCommand(0x80000000)), { code: 'EINVAL' }, 'a raw TPM handle: EINVAL');
    const cut = Buffer.from(signCommand(0x80ffffff).subarray(0, 12));
    cut.writeUInt32BE(12, 2);
    await t.rejects(b.write(cut), { code: 'EINVAL' }, 'truncated inside its handle: EINVAL');
    const mismatch = Buffer.from(GETRANDOM);
    mismatch.writeUInt32BE(GETRANDOM.length + 4, 2);
    await t.rejects(b.write(mismatch), { code: 'EINVAL' }, 'size field beyond the bytes: EINVAL');
    const big = Buffer.alloc(5000);
    big.writeUInt16BE(0x8001, 0);
    big.writeUInt32BE(5000, 2);
    await t.rejects(b.write(big), { code: 'E2BIG' }, 'oversized: E2BIG');
    const unknown = await roundTrip(b, buildCommand(tpm2.TPM_ST_NO_SESSIONS, 0x7ffffff0, (w) => w.u32(0)));
    t.equal(rcOf(unknown), 0x000b0143, 'unknown command: TPM_RC_COMMAND_CODE in the resource manager layer');
    t.equal(unknown.length, 10);
    const persistent = await roundTrip(b, signCommand(0x81000999));
    t.equal(rcOf(persistent) & 0xbf, 0x8b, 'an unknown persistent handle: the TPM\'s TPM_RC_HANDLE');
    t.same(await handles(b, TRANSIENT), [], 'B sees no object');
    t.ok(await signVerifies(ca, key, randomBytes(16)), 'A\'s key still signs for A');
    t.equal(rcOf(await roundTrip(b)), 0, 'B still works');
  });

  t.test('tpm-dev rules per tpmrm0 file: partial reads, EBUSY while unread, 0 when empty', async (t) => {
    const fh = await open(rm, 'r+');
    t.teardown(() => fh.close());
    const b = Buffer.alloc(4096);
    t.equal((await fh.read(b, 0, 4096, null)).bytesRead, 0, 'nothing pending');
    await fh.write(GETRANDOM);
    await t.rejects(fh.write(GETRANDOM), { code: 'EBUSY' });
    t.equal((await fh.read(b, 0, 10, null)).bytesRead, 10);
    t.equal((await fh.read(b, 10, 4086, null)).bytesRead, 18, 'the rest');
    t.equal(rcOf(await roundTrip(fh)), 0);
  });

  t.test('tpm0 and tpmrm0 interleaved: each file gets its own response', async (t) => {
    const tpm0 = await open(node.path, 'r+');
    const r1 = await open(rm, 'r+');
    t.teardown(() => Promise.all([tpm0.close(), r1.close()]));
    for (let i = 0; i < 20; i++) {
      await tpm0.write(GETRANDOM); // not read yet: with a split backend it is still in flight
      const mine = await roundTrip(r1, tpm2.getRandom(8));
      t.equal(mine.length, 20, 'tpmrm0 got its 8 random bytes');
      const b = Buffer.alloc(4096);
      const n = (await tpm0.read(b, 0, 4096, null)).bytesRead;
      if (n !== 28 || b.readUInt32BE(2) !== 28 || rcOf(b) !== 0) {
        t.fail(`tpm0 response ${i} damaged: ${b.subarray(0, n).toString('hex')}`);
        return;
      }
    }
    t.pass('20 tpm0 responses intact around tpmrm0 commands');
  });
}
