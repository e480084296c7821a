// The tpm0 scenario suite, run against each kind of front end (raw.test.ts, native.test.ts,
// frontd-scenarios.test.ts; node-kinds.ts) through a real mount: real tpm2-tools, then
// syscall-level rules with Node's fs (async, so a front end serving on this thread is never
// blocked by them).
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { Test } from 'tap';
import type { TpmNode } from '../../drivers/tpmfront/mount.ts';
import { canLoseBackend, mountKind, type KindNode, type NodeKind } from './node-kinds.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';

const run = promisify(execFile);
const GETRANDOM = Buffer.from(tpm2.getRandom(16));

async function tool(node: TpmNode, cmd: string, ...args: string[]): Promise<string> {
  const r = await run(cmd, ['-T', `device:${node.path}`, ...args], { timeout: 20_000 });
  return r.stdout;
}

/** One command through an open node file: write it whole, read the response. */
export async function roundTrip(fh: FileHandle, cmd: Uint8Array = GETRANDOM): Promise<Buffer> {
  const w = await fh.write(cmd);
  if (w.bytesWritten !== cmd.length) throw new Error(`short write ${w.bytesWritten}`);
  const out = Buffer.alloc(4096);
  const r = await fh.read(out, 0, out.length, null);
  return out.subarray(0, r.bytesRead);
}

export const rcOf = (rsp: Buffer) => rsp.readUInt32BE(6);

export function nodeScenarios(t: Test, kind: NodeKind): void {
  const dir = mkdtempSync(join(tmpdir(), `vtpm-tpmfront-${kind}-`));
  let node!: TpmNode;
  let mounted: KindNode | undefined;
  t.before(async () => {
    mounted = await mountKind(kind, dir);
    node = mounted.node;
  });
  t.teardown(async () => {
    await mounted?.cleanup();
    rmSync(dir, { recursive: true, force: true });
  });

  t.test('tpm2-tools: getrandom, pcrextend + pcrread, createprimary + flush', async (t) => {
    const rnd = await tool(node, 'tpm2_getrandom', '--hex', '16');
    t.match(rnd.trim(), /^[0-9a-f]{32}$/);
    const digest = createHash('sha256').update('tpmfront').digest();
    await tool(node, 'tpm2_pcrextend', `16:sha256=${digest.toString('hex')}`);
    const expected = createHash('sha256').update(Buffer.alloc(32)).update(digest).digest('hex');
    const pcr = await tool(node, 'tpm2_pcrread', 'sha256:16');
    t.match(pcr.toLowerCase(), new RegExp(`16\\s*:\\s*0x${expected}`), 'PCR 16 = H(0 || digest)');
    const ctx = join(dir, 'primary.ctx');
    const out = await tool(node, 'tpm2_createprimary', '-C', 'o', '-G', 'ecc', '-c', ctx);
    t.match(out, /name-alg/);
    await tool(node, 'tpm2_flushcontext', '-t');
    const handles = await tool(node, 'tpm2_getcap', 'handles-transient');
    t.equal(handles.trim(), '', 'no transient object left');
  });

  t.test('ls shows tpm0 with mode 0600', async (t) => {
    const r = await run('ls', ['-l', node.dir]);
    t.match(r.stdout, /^-rw------- 1 root root 0 .* tpm0$/m);
  });

  t.test('a second opener gets EBUSY (after the grace), the first keeps working', async (t) => {
    const a = await open(node.path, 'r+');
    const t0 = performance.now();
    await t.rejects(open(node.path, 'r+'), { code: 'EBUSY' });
    t.ok(performance.now() - t0 >= 200, 'EBUSY came after the release grace');
    t.equal(rcOf(await roundTrip(a)), 0);
    await a.close();
  });

  t.test('bad input gets EINVAL / E2BIG / a TPM error, and the node still works', async (t) => {
    const fh = await open(node.path, 'r+');
    t.teardown(() => fh.close());
    const junk = randomBytes(64);
    junk.writeUInt32BE(1000, 2); // random bytes with a size field that cannot match
    await t.rejects(fh.write(junk), { code: 'EINVAL' }, 'random bytes');
    await t.rejects(fh.write(Buffer.from([0x80, 0x01, 0, 0, 0])), { code: 'EINVAL' }, 'short write');
    const wrong = Buffer.from(GETRANDOM);
    wrong.writeUInt32BE(GETRANDOM.length + 1, 2);
    await t.rejects(fh.write(wrong), { code: 'EINVAL' }, 'size field one too big');
    wrong.writeUInt32BE(GETRANDOM.length - 1, 2);
    await t.rejects(fh.write(wrong), { code: 'EINVAL' }, 'size field one too small');
    const big = Buffer.alloc(5000);
    big.writeUInt16BE(0x8001, 0);
    big.writeUInt32BE(5000, 2);
    await t.rejects(fh.write(big), { code: 'E2BIG' }, '5000-byte write (Linux answers E2BIG)');
    const framed = randomBytes(64);
    framed.writeUInt16BE(0x8001, 0);
    framed.writeUInt32BE(64, 2);
    framed.writeUInt32BE(0x7ffffff0, 6); // no such command code
    const rsp = await roundTrip(fh, framed);
    t.not(rcOf(rsp), 0, `well-framed garbage gets a TPM error response (rc 0x${rcOf(rsp).toString(16)})`);
    const ok = await roundTrip(fh);
    t.equal(rcOf(ok), 0, 'GetRandom still works');
    t.equal(ok.length, 10 + 2 + 16);
  });

  t.test('partial reads, 0 when nothing is pending, EBUSY while a response is unread', async (t) => {
    const fh = await open(node.path, 'r+');
    t.teardown(() => fh.close());
    const b = Buffer.alloc(4096);
    t.equal((await fh.read(b, 0, 4096, null)).bytesRead, 0, 'nothing pending');
    t.equal((await fh.write(GETRANDOM)).bytesWritten, GETRANDOM.length);
    await t.rejects(fh.write(GETRANDOM), { code: 'EBUSY' }, 'write while the response is unread');
    t.equal((await fh.read(b, 0, 10, null)).bytesRead, 10, 'header');
    t.equal(b.readUInt32BE(2), 28);
    t.equal((await fh.read(b, 10, 5, null)).bytesRead, 5);
    t.equal((await fh.read(b, 15, 4096 - 15, null)).bytesRead, 13, 'the rest');
    t.equal((await fh.read(b, 0, 4096, null)).bytesRead, 0, 'drained');
    t.equal(rcOf(await roundTrip(fh)), 0, 'writable again');
    t.equal((await fh.write(GETRANDOM)).bytesWritten, GETRANDOM.length);
    // closing with an unread response drops it: the next opener starts clean
  });

  t.test('the unread response of a closed opener is gone for the next one', async (t) => {
    const fh = await open(node.path, 'r+');
    const b = Buffer.alloc(4096);
    t.equal((await fh.read(b, 0, 4096, null)).bytesRead, 0);
    await fh.close();
  });

  t.test('close + reopen 100 times in a tight loop never gets EBUSY', async (t) => {
    let busy = 0;
    for (let i = 0; i < 100; i++) {
      let fh: FileHandle;
      try {
        fh = await open(node.path, 'r+');
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EBUSY') busy++;
        else throw e;
        continue;
      }
      if (rcOf(await roundTrip(fh)) !== 0) t.fail('GetRandom failed');
      await fh.close();
    }
    t.equal(busy, 0);
  });

  t.test('unmount while a client holds tpm0: the client gets an error, no hang', async (t) => {
    const fh = await open(node.path, 'r+');
    t.equal(rcOf(await roundTrip(fh)), 0);
    const t0 = performance.now();
    await node.close();
    t.ok(performance.now() - t0 < 5000, 'close returned');
    await t.rejects(fh.write(GETRANDOM), { code: /ENOTCONN|ENODEV|EIO/ }, 'write after unmount');
    await fh.close().catch(() => undefined);
    t.notOk(readFileSync('/proc/mounts', 'utf8').includes(` ${node.dir} `), 'unmounted');
  });

  // A node whose backend we stop: native's is a separate thread, frontd's a vtpmd process
  // (killed); the raw front end's backend lives inside its FUSE worker.
  const skip = canLoseBackend(kind) ? false : `${kind}: no way yet to lose a backend that lives in the FUSE worker`;
  t.test('a backend that goes away: the next command fails with EIO, no hang', { skip }, async (t) => {
    const { node: n2, lose } = await mounted!.losable(join(dir, 'dev2'));
    t.teardown(() => n2.close());
    const fh = await open(n2.path, 'r+');
    t.teardown(() => fh.close().catch(() => undefined));
    t.equal(rcOf(await roundTrip(fh)), 0);
    await lose();
    // Answered at the write (native) or, with a split backend (vtpmd), at the read after it.
    await t.rejects(roundTrip(fh), { code: 'EIO' });
  });
}
