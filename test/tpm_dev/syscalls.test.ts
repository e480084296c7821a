// The device driver's system-call plumbing (open, write, poll, read, close through koffi)
// on real kernel objects: a missing path, /dev/null, and a FIFO, whose loopback gives back
// what was written, so the header-then-rest reads, partial reads arriving later, poll
// timeouts and a never-blocked event loop are checked without any TPM stand-in.
import t from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { TpmDevice } from '../../drivers/tpm_dev/device.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-dev-sys-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

function fifo(name: string): string {
  const p = path.join(dir, name);
  execFileSync('mkfifo', ['-m', '0600', p]);
  return p;
}

t.test('open errors are typed', async (t) => {
  await t.rejects(TpmDevice.open(path.join(dir, 'nope')), { code: 'ENOENT', message: /ENOENT/ });
  await t.rejects(TpmDevice.open(dir), { code: 'EIO', message: /EISDIR/ });
});

t.test('a device that answers nothing gives EIO, not a hang', async (t) => {
  const d = await TpmDevice.open('/dev/null');
  await t.rejects(d.transmit(tpm2.getRandom(8)), { code: 'EIO', message: /gave no response/ });
  await d.close();
  await t.rejects(d.transmit(tpm2.getRandom(8)), { code: 'ECLOSED' });
});

t.test('write, poll, header read then the rest (FIFO loopback)', async (t) => {
  const d = await TpmDevice.open(fifo('loop'));
  const cmd = tpm2.getRandom(8);
  t.same(await d.transmit(cmd), cmd, 'the 12 bytes came back through read');
  const big = new Uint8Array(4096);
  big.set([0x80, 0x01, 0, 0, 0x10, 0x00]);
  big.fill(0xa5, 10);
  t.same(await d.transmit(big), big, 'a 4096-byte message in header + rest');
  const bad = new Uint8Array(10);
  bad.set([0x80, 0x01, 0, 0, 0x20, 0x00]);
  await t.rejects(d.transmit(bad), { code: 'EIO', message: /size field 8192 .* out of range/ });
  await t.rejects(d.transmit(new Uint8Array(4)), { code: 'EINVAL' });
  await d.close();
});

t.test('a response arriving in pieces is read across polls; the event loop keeps running', async (t) => {
  const p = fifo('pieces');
  const d = await TpmDevice.open(p);
  // Size field says 30; 12 bytes are ours, the other 18 come from another process later.
  const cmd = tpm2.getRandom(8).slice();
  cmd[5] = 30;
  const writer = spawn('sh', ['-c', `sleep 0.2; head -c 9 /dev/zero > ${p}; sleep 0.1; head -c 9 /dev/zero > ${p}`], { stdio: 'ignore' });
  t.teardown(() => void writer.kill());
  let ticks = 0;
  const timer = setInterval(() => ticks++, 10);
  const t0 = Date.now();
  const r = await d.transmit(cmd);
  clearInterval(timer);
  t.equal(r.length, 30, 'the whole 30 bytes');
  t.same(r.subarray(0, 12), cmd, 'ours first');
  t.same(r.subarray(12), new Uint8Array(18), 'then the late pieces');
  t.ok(Date.now() - t0 >= 250, 'it waited for them');
  t.ok(ticks >= 10, `the event loop ran while the driver waited (${ticks} ticks)`);
  await d.close();
});

t.test('no response within the timeout is ETIMEDOUT', async (t) => {
  const d = await TpmDevice.open(fifo('slow'), { responseTimeoutMs: 200 });
  const cmd = tpm2.getRandom(8).slice();
  cmd[5] = 40; // more than will ever come
  await t.rejects(d.transmit(cmd), { code: 'ETIMEDOUT', message: /within 200 ms/ });
  await d.close();
});
