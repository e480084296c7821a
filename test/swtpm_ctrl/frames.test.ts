// Bad, truncated and oversized control frames get swtpm's error results and the server
// lives; SET_DATAFD with a descriptor over SCM_RIGHTS; the data channel's framing (TCG
// command header, oversized size fields); hooks that keep exported blobs encrypted.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { POLLIN, sysClose, sysPollIn, sysRead, sysWrite } from '../../drivers/base/libc.ts';
import { streamPair, sysSendmsg, unixConnect } from '../../drivers/base/libc-sockets.ts';
import { CMD, RES } from '../../drivers/swtpm_ctrl/protocol.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { be32, dataClient, ioctl, rawCtrl, rcOf, serve } from './helpers.ts';
import { extend256, pcrRead256, pcrValue, sha256 } from './tpm-cmds.ts';

const HOOKS = join(import.meta.dirname, 'sealing-hooks.ts');

t.test('bad and oversized control frames', async (t) => {
  const s = await serve({ tpm: '2.0', args: ['--startup-clear'] });
  t.teardown(s.stop);
  t.equal((await ioctl(s.ctrl, '-i')).code, 0);
  const res = (b: Buffer) => (b.length >= 4 ? b.readUInt32BE(0) : -1);

  t.equal(res((await rawCtrl(s.ctrl, [be32(0x99)], { expect: 4 })).first), RES.BAD_ORDINAL, 'unknown command: TPM_BAD_ORDINAL');
  t.equal(res((await rawCtrl(s.ctrl, [be32(0xffffffff)], { expect: 4 })).first), RES.BAD_ORDINAL, 'command 0xffffffff');
  t.equal(res((await rawCtrl(s.ctrl, [be32(CMD.STOP, 0)], { expect: 4 })).first), RES.BAD_PARAMETER, 'STOP with a payload');
  t.equal(res((await rawCtrl(s.ctrl, [be32(CMD.INIT, 0, 0)], { expect: 4 })).first), RES.BAD_PARAMETER, 'INIT with 8 payload bytes');
  t.equal(res((await rawCtrl(s.ctrl, [be32(CMD.SET_LOCALITY, 0x05000000)], { expect: 4 })).first), RES.BAD_LOCALITY, 'locality 5');

  // Truncated: the frame stalls; after swtpm's 500 ms the answer is TPM_BAD_PARAMETER and
  // the same connection still works.
  const stalled = await rawCtrl(s.ctrl, [Buffer.from([0, 0])], { expect: 4, waitMs: 3000, then: be32(CMD.GET_CAPABILITY), thenExpect: 8 });
  t.equal(res(stalled.first), RES.BAD_PARAMETER, 'a 2-byte frame');
  t.equal(res(stalled.second!), 0, 'then GET_CAPABILITY on the same connection');
  const halfInfo = await rawCtrl(s.ctrl, [be32(CMD.GET_INFO, 0)], { expect: 4 });
  t.equal(res(halfInfo.first), RES.BAD_PARAMETER, 'GET_INFO missing half its request');
  const getInfoBeyond = await rawCtrl(s.ctrl, [Buffer.concat([be32(CMD.GET_INFO, 0, 1, 1 << 20, 0)])], { expect: 4 });
  t.equal(res(getInfoBeyond.first), RES.BAD_PARAMETER, 'GET_INFO offset beyond the string');

  // Oversized: declared lengths beyond the bounds are refused at once, and input is dropped
  // until the sender has been quiet for 100 ms (the rest of such a frame is not a command).
  const bigHash = await rawCtrl(s.ctrl, [be32(CMD.HASH_DATA, 100000), randomBytes(8192)], { expect: 4, then: be32(CMD.GET_CAPABILITY), thenExpect: 8, thenDelayMs: 400 });
  t.equal(res(bigHash.first), RES.BAD_PARAMETER, 'HASH_DATA of 100000 bytes');
  t.equal(bigHash.first.length, 4, 'one answer, the drained bytes were not read as commands');
  t.equal(res(bigHash.second!), 0, 'connection still serves');
  t.equal((await ioctl(s.ctrl, '--stop')).code, 0);
  const bigBlob = await rawCtrl(s.ctrl, [be32(CMD.SET_STATEBLOB, 0, 1, 0x40000000), randomBytes(16384)], { expect: 4 });
  t.equal(res(bigBlob.first), RES.FAIL, 'a 1 GiB state blob: TPM_FAIL (as swtpm)');
  const shortBlob = await rawCtrl(s.ctrl, [be32(CMD.SET_STATEBLOB, 0, 1, 100), randomBytes(50)], { expect: 4 });
  t.equal(res(shortBlob.first), RES.BAD_PARAMETER, 'a blob that stops short of its length');
  const badType = await rawCtrl(s.ctrl, [be32(CMD.SET_STATEBLOB, 0, 7, 4), randomBytes(4)], { expect: 4 });
  t.equal(res(badType.first), RES.BAD_PARAMETER, 'blob type 7');
  const garbageBlob = await rawCtrl(s.ctrl, [be32(CMD.SET_STATEBLOB, 0, 1, 64), randomBytes(64)], { expect: 4 });
  t.equal(res(garbageBlob.first), 0, 'a garbage permanent blob is stored...');
  t.not((await ioctl(s.ctrl, '-i')).code, 0, '...and INIT refuses to start from it');
  // Random bytes by the kilobyte: answers of some sort, and the server lives.
  await rawCtrl(s.ctrl, [randomBytes(65536)], { waitMs: 1500 });
  t.ok(s.alive(), 'server alive after 64 KiB of garbage');
  t.match((await ioctl(s.ctrl, '-c')).stdout, /ptm capability is 0x1ffff/, 'and answers swtpm_ioctl');
});

t.test('SET_DATAFD: the data channel arrives over SCM_RIGHTS', async (t) => {
  const s = await serve({ tpm: '2.0', args: ['--startup-clear', '--not-need-init'] });
  t.teardown(s.stop);
  const fd = unixConnect(s.ctrl);
  t.teardown(() => sysClose(fd));
  const pfd = Buffer.alloc(8);
  const ask = (frame: Uint8Array, passFd = -1): number => {
    t.equal(sysSendmsg(fd, frame, passFd), frame.length);
    t.ok(sysPollIn(fd, 5000, pfd) & POLLIN, 'answer arrives');
    const b = new Uint8Array(64);
    const n = sysRead(fd, b, 64);
    return n >= 4 ? Buffer.from(b.subarray(0, n)).readUInt32BE(0) : -1;
  };
  t.equal(ask(be32(CMD.SET_DATAFD)), RES.BAD_PARAMETER, 'no descriptor attached');
  const [mine, theirs] = streamPair();
  t.teardown(() => sysClose(mine));
  t.equal(ask(be32(CMD.SET_DATAFD), theirs), 0, 'descriptor accepted');
  sysClose(theirs);
  const [m2, t2] = streamPair();
  t.equal(ask(be32(CMD.SET_DATAFD), t2), RES.IOERROR, 'a second data channel while one is connected');
  sysClose(m2);
  sysClose(t2);
  // TPM commands on our end of the pair.
  const cmd = tpm2.getRandom(8);
  t.equal(sysWrite(mine, cmd, cmd.length), cmd.length);
  t.ok(sysPollIn(mine, 5000, pfd) & POLLIN);
  const resp = new Uint8Array(64);
  const n = sysRead(mine, resp, 64);
  t.equal(n, 10 + 2 + 8, 'GetRandom response over the passed descriptor');
  t.equal(rcOf(resp.subarray(0, n)), 0);
  // The TCG command header (PTM_CAP_SEND_COMMAND_HEADER): u32 8, locality, size, command;
  // answered with u32 size, the response, u32 0.
  const hdr = Buffer.concat([be32(8), Buffer.from([0]), be32(cmd.length), cmd]);
  t.equal(sysWrite(mine, hdr, hdr.length), hdr.length);
  t.ok(sysPollIn(mine, 5000, pfd) & POLLIN);
  const n2 = sysRead(mine, resp, 64);
  const r2 = Buffer.from(resp.subarray(0, n2));
  t.equal(n2, 4 + 20 + 4, 'size prefix + response + acknowledgement');
  t.equal(r2.readUInt32BE(0), 20);
  t.equal(rcOf(r2.subarray(4)), 0);
  t.equal(r2.readUInt32BE(24), 0, 'ack');
});

t.test('data channel: oversized and undersized size fields', async (t) => {
  const s = await serve({ tpm: '2.0', args: ['--startup-clear', '--not-need-init'] });
  t.teardown(s.stop);
  const d = await dataClient(s.data);
  t.teardown(d.close);
  const huge = Buffer.from(tpm2.getRandom(8));
  huge.writeUInt32BE(0x10000, 2);
  const r = await d.send(huge, 10);
  t.equal(rcOf(r), 0x142, 'TPM_RC_COMMAND_SIZE for a 64 KiB size field');
  await new Promise((r) => setTimeout(r, 400)); // the rest of the stream is dropped until 100 ms of quiet
  const tiny = Buffer.from(tpm2.getRandom(8));
  tiny.writeUInt32BE(4, 2);
  t.equal(rcOf(await d.send(tiny, 10)), 0x142, 'a size field below the header');
  await new Promise((r) => setTimeout(r, 300)); // the drain ends after 100 ms of quiet
  t.equal(rcOf(await d.send(tpm2.getRandom(8))), 0, 'the channel serves again');
  t.ok(s.alive());
});

t.test('hooks keep exported blobs encrypted for the owner', async (t) => {
  const work = mkdtempSync(join(tmpdir(), 'swtpm-ctrl-hooks-'));
  t.teardown(() => rmSync(work, { recursive: true, force: true }));
  const key = randomBytes(32).toString('hex');
  const hooks = ['--hooks', `${HOOKS}#sealingHooks`, '--hooks-params', JSON.stringify({ key })];
  const a = await serve({ tpm: '2.0', args: ['--startup-clear', ...hooks] });
  t.teardown(a.stop);
  t.equal((await ioctl(a.ctrl, '-i')).code, 0);
  const d = await dataClient(a.data);
  t.teardown(d.close);
  const digest = sha256(Buffer.from('sealed'));
  t.equal(rcOf(await d.send(extend256(16, digest))), 0);
  const want = pcrValue(await d.send(pcrRead256(16)));
  const vol = join(work, 'vol');
  const perm = join(work, 'perm');
  t.equal((await ioctl(a.ctrl, '--save', 'volatile', vol)).code, 0);
  t.equal((await ioctl(a.ctrl, '--save', 'permanent', perm)).code, 0);
  t.equal(readFileSync(vol).subarray(0, 8).toString(), 'VTPMSEAL', 'what QEMU would get is sealed for the owner, although it asked for plain bytes');

  const b = await serve({ tpm: '2.0', args: hooks });
  t.teardown(b.stop);
  const tampered = readFileSync(vol);
  tampered[tampered.length - 1]! ^= 1;
  const bad = join(work, 'bad');
  writeFileSync(bad, tampered);
  const r = await ioctl(b.ctrl, '--load', 'volatile', bad);
  t.not(r.code, 0, 'a tampered blob is refused');
  t.match(r.stderr, /0x9\b/);
  t.equal((await ioctl(b.ctrl, '--load', 'permanent', perm)).code, 0);
  t.equal((await ioctl(b.ctrl, '--load', 'volatile', vol)).code, 0);
  t.equal((await ioctl(b.ctrl, '-i')).code, 0);
  const d2 = await dataClient(b.data);
  t.teardown(d2.close);
  t.same(pcrValue(await d2.send(pcrRead256(16))), want, 'sealed blobs resume the TPM on the other side');
  const sealedPerm = readFileSync(perm);
  const other = await serve({ tpm: '2.0', args: ['--hooks', `${HOOKS}#sealingHooks`, '--hooks-params', JSON.stringify({ key: randomBytes(32).toString('hex') })] });
  t.teardown(other.stop);
  writeFileSync(perm, sealedPerm);
  t.not((await ioctl(other.ctrl, '--load', 'permanent', perm)).code, 0, 'another key cannot open it');
});
