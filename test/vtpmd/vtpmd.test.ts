// vtpmd as a real process: joined to an authority, serving a front end that lives in this
// test process through xenbus + the tpmif shared page; state persists across restarts.
import t from 'tap';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startDaemon, stopProcess } from '../../drivers/host/daemon.ts';
import { parseResponse } from '../../drivers/tpm/command.ts';
import * as tpm12 from '../../drivers/tpm/tpm12.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { startAuthority } from '../../drivers/xen/authority-launch.ts';
import { Domain } from '../../drivers/xen/domain.ts';
import { XenbusFront } from '../../drivers/tpmfront/xenbus-front.ts';

const root = join(import.meta.dirname, '../..');
const dir = mkdtempSync(join(tmpdir(), 'vtpm-vtpmd-'));
const auth = await startAuthority(dir);
t.teardown(async () => {
  await auth.stop();
  rmSync(dir, { recursive: true, force: true });
});

async function startVtpmd(name: string, tpm: '1.2' | '2.0', front: number) {
  return startDaemon(join(root, 'vtpmd/main.ts'), ['--dir', dir, '--name', name, '--tpm', tpm, '--front', String(front)], {
    log: join(dir, `${name}.log`),
  });
}

t.test('TPM 2.0 vtpmd serves a front end over the shared page; state survives a restart', async (t) => {
  const guest = await Domain.join(dir, { name: 'guest-a' });
  t.teardown(() => guest.leave());
  let vtpmd = await startVtpmd('a', '2.0', guest.domid);
  t.teardown(() => stopProcess(vtpmd.pid));
  const xf = await XenbusFront.start(guest, { backendId: Number(vtpmd.info.domid) });
  let link = await xf.connected(10_000);
  // Booted by vtpmd (Startup + SelfTest): the first guest command just works.
  t.equal(tpm2.parseGetRandom(await link.front.send(tpm2.getRandom(16))).length, 16);
  const digest = createHash('sha256').update('boot').digest();
  tpm2.parsePcrExtend(await link.front.send(tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest }])));
  const pcr = tpm2.parsePcrRead(await link.front.send(tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [16] }]))).digests[0]!;
  t.equal(Buffer.from(pcr).toString('hex'), createHash('sha256').update(Buffer.alloc(32)).update(digest).digest('hex'));
  const st = statSync(join(dir, 'a', 'state'));
  t.equal(st.mode & 0o777, 0o700, 'state dir is 0700');
  t.equal(statSync(join(dir, 'a', 'state', 'permall')).mode & 0o777, 0o600, 'state blob is 0600');

  // Kill vtpmd: the front end's next command fails (no hang); a new vtpmd serves the same TPM.
  const permallBefore = statSync(join(dir, 'a', 'state', 'permall')).size;
  process.kill(vtpmd.pid, 'SIGKILL');
  await t.rejects(link.front.send(tpm2.getRandom(8), 0, 5000), { name: 'VtpmError' });
  await xf.close().catch(() => {});
  vtpmd = await startVtpmd('a', '2.0', guest.domid);
  const xf2 = await XenbusFront.start(guest, { backendId: Number(vtpmd.info.domid) });
  t.teardown(() => xf2.close());
  t.ok(permallBefore > 0);
  link = await xf2.connected(10_000);
  t.equal(tpm2.parseGetRandom(await link.front.send(tpm2.getRandom(8))).length, 8, 'restarted vtpmd answers');
  t.equal(await stopProcess(vtpmd.pid), 'exited', 'SIGTERM stops vtpmd cleanly');
});

t.test('TPM 1.2 vtpmd boots its TPM (Startup + ContinueSelfTest) before serving', async (t) => {
  const guest = await Domain.join(dir, { name: 'guest-b' });
  t.teardown(() => guest.leave());
  const vtpmd = await startVtpmd('b', '1.2', guest.domid);
  t.teardown(() => stopProcess(vtpmd.pid));
  const xf = await XenbusFront.start(guest, { backendId: Number(vtpmd.info.domid) });
  t.teardown(() => xf.close());
  const link = await xf.connected(10_000);
  t.equal(tpm12.parseGetRandom(await link.front.send(tpm12.getRandom(16))).length, 16);
  // A second Startup is refused: the TPM was started exactly once, by vtpmd.
  const again = parseResponse(await link.front.send(tpm12.startup()), '1.2', false);
  t.equal(again.rc, 38, 'TPM_INVALID_POSTINIT');
});

t.test('vtpmd refuses bad arguments with a reason', async (t) => {
  await t.rejects(startDaemon(join(root, 'vtpmd/main.ts'), ['--dir', dir, '--name', 'c', '--tpm', '3.0', '--front', '1'], { log: join(dir, 'c.log') }), {
    message: /usage: vtpmd/,
  });
});
