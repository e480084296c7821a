// SocketTransport against a real `swtpm socket` (TCP and unix socket), and against a
// loopback peer that hands our own bytes back, for the framing and failure rules.
import t from 'tap';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { parseResponse } from '../../drivers/tpm/command.ts';
import { SocketTransport } from '../../drivers/tpm/socket-transport.ts';
import { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { scratchDir, type Tap } from '../clients/run.ts';
import { freePortPair, startSwtpm, stopChild } from '../clients/swtpm.ts';

t.test('TPM 2.0 commands to swtpm over TCP, in order, concurrent callers queued', async (t) => {
  const sw = await startSwtpm(t, '2.0');
  const tpm = await SocketTransport.connect({ host: sw.host, port: sw.port });
  t.teardown(() => tpm.close());
  const c = new Tpm2Client(tpm);
  t.equal(await c.startup(), false, 'swtpm came up started (startup-clear)');
  const many = await Promise.all(Array.from({ length: 20 }, (_, i) => c.getRandom(1 + i)));
  t.same(many.map((r) => r.length), Array.from({ length: 20 }, (_, i) => 1 + i), 'each caller got its own response');
  const digest = new Uint8Array(32).fill(7);
  tpm2.parsePcrExtend(await tpm.transmit(tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest }])));
  const pcr = tpm2.parsePcrRead(await tpm.transmit(tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [16] }])));
  t.equal(pcr.digests[0]!.length, 32, 'PCR_Read after PCR_Extend');
  await t.rejects(tpm.transmit(tpm2.getRandom(8), 3), { code: 'EINVAL', message: /carries no locality/ });
});

t.test('TPM 1.2 over a unix socket', async (t) => {
  const dir = scratchDir(t, 'swtpm-unix');
  const sock = path.join(dir, 'data.sock');
  const proc = spawn('swtpm', ['socket', '--server', `type=unixio,path=${sock}`, '--ctrl', `type=unixio,path=${path.join(dir, 'ctrl.sock')}`, '--tpmstate', `dir=${dir}`, '--flags', 'not-need-init,startup-clear'], { stdio: 'ignore' });
  t.teardown(() => stopChild(proc));
  for (let i = 0; i < 250 && !fs.existsSync(sock); i++) await new Promise((r) => setTimeout(r, 20));
  const tpm = await SocketTransport.connect({ path: sock });
  t.equal(tpm.description, `TPM socket ${sock}`);
  const rsp = parseResponse(await tpm.transmit(Uint8Array.from([0x00, 0xc1, 0, 0, 0, 14, 0, 0, 0, 0x46, 0, 0, 0, 8])), '1.2');
  t.equal(rsp.body.u32(), 8, 'TPM_GetRandom(8) answered');
  await tpm.close();
  await t.rejects(tpm.transmit(tpm2.getRandom(8)), { code: 'ECLOSED' });
});

/** A peer that sends back whatever it is sent, then maybe something of its own. */
async function loopback(t: Tap, extra?: (s: net.Socket, d: Buffer) => void): Promise<number> {
  const server = net.createServer((s) => s.on('data', (d) => (extra ? extra(s, d) : s.write(d))));
  const port = await freePortPair(); // below 32768, as every test port here
  await new Promise<void>((r) => server.listen(port, '127.0.0.1', () => r()));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  return port;
}

t.test('framing and failures on a loopback peer', async (t) => {
  const port = await loopback(t);
  const tpm = await SocketTransport.connect({ host: '127.0.0.1', port });
  const big = new Uint8Array(4096);
  big.set([0x80, 0x01, 0, 0, 0x10, 0x00]);
  big.fill(0x5a, 10);
  t.same(await tpm.transmit(big), big, 'a 4096-byte message, however TCP splits it');
  const bad = Uint8Array.from([0x80, 0x01, 0, 0, 0x20, 0, 0, 0, 0, 0]);
  await t.rejects(tpm.transmit(bad), { code: 'EIO', message: /size field 8192 is out of range/ });
  await t.rejects(tpm.transmit(tpm2.getRandom(8)), { code: 'EIO' }, 'the connection is given up after a broken frame');
  await tpm.close();

  const slow = await SocketTransport.connect({ host: '127.0.0.1', port: await loopback(t, () => {}) }, { timeoutMs: 100 });
  await t.rejects(slow.transmit(tpm2.getRandom(8)), { code: 'ETIMEDOUT', message: /within 100 ms/ });
  await slow.close();

  const hangup = await SocketTransport.connect({ host: '127.0.0.1', port: await loopback(t, (s) => s.destroy()) });
  await t.rejects(hangup.transmit(tpm2.getRandom(8)), { code: 'ECLOSED' });
  await hangup.close();

  await t.rejects(SocketTransport.connect({ path: path.join(scratchDir(t, 'nosock'), 'none.sock') }), { code: 'ENOENT' });
});
