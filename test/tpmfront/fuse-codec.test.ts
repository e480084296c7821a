// FUSE protocol edge cases against the raw front end's serve loop, fed through one end of a
// SOCK_SEQPACKET pair (message-preserving like /dev/fuse) while the real worker (with a
// libtpms backend) serves the other end.
import t, { type Test } from 'tap';
import type { Worker } from 'node:worker_threads';
import { engineBackendSpec } from '../../drivers/libtpms/engine-backend.ts';
import * as P from '../../drivers/tpmfront/fuse-proto.ts';
import type { RawWorkerData, RawWorkerMessage } from '../../drivers/tpmfront/fuse-raw-worker.ts';
import { ERRNO, seqpacketPair, sysClose, sysPollIn, sysRead, sysWrite } from '../../drivers/base/libc.ts';
import { startWorker } from '../../drivers/base/modules.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';

const GRACE = 150;
const [ours, theirs] = seqpacketPair();
const messages: RawWorkerMessage[] = [];
const data: RawWorkerData = { fd: theirs, backend: engineBackendSpec({ version: '2.0' }), stop: new SharedArrayBuffer(4), graceMs: GRACE };
const worker: Worker = startWorker(new URL('../../drivers/tpmfront/fuse-raw-worker.ts', import.meta.url), { workerData: data });
worker.on('message', (m: RawWorkerMessage) => messages.push(m));
const exited = new Promise<number>((r) => worker.once('exit', r));
let oursOpen = true;
t.teardown(async () => {
  if (oursOpen) sysClose(ours);
  await Promise.race([exited, new Promise((r) => setTimeout(r, 3000))]);
  await worker.terminate();
});

/** The running subtest: the helpers' assertions belong to it. */
let T: Test = t;
let nextUnique = 2;
const buf = new Uint8Array(16384);
const pfd = Buffer.alloc(8);

function send(opcode: number, nodeid: number, body: (w: P.LeWriter) => void = () => {}, unique = (nextUnique += 2)): number {
  const out = new Uint8Array(16384);
  const w = new P.LeWriter(out).reset(P.IN_HEADER);
  body(w);
  const len = w.pos;
  w.reset(0).u32(len).u32(opcode).u64(unique).u64(nodeid).u32(0).u32(0).u32(process.pid).u32(0);
  T.equal(sysWrite(ours, out, len), len, `sent opcode ${opcode}`);
  return unique;
}

function sendRaw(bytes: Uint8Array): void {
  T.equal(sysWrite(ours, bytes, bytes.length), bytes.length);
}

interface Reply {
  error: number;
  unique: number;
  payload: P.LeReader;
  len: number;
}

/** The next reply, or null when none comes within `ms`. */
function recv(ms = 3000): Reply | null {
  const rev = sysPollIn(ours, ms, pfd);
  if (rev <= 0) return null;
  const n = sysRead(ours, buf, buf.length);
  if (n <= 0) return null;
  const r = new P.LeReader(buf).reset(0, n);
  const len = r.u32();
  const error = new DataView(buf.buffer).getInt32(4, true);
  r.u32();
  const unique = r.u64();
  T.equal(len, n, 'reply length field matches the message');
  return { error, unique, payload: r, len };
}

function expectReply(unique: number, error: number, what: string): Reply {
  const r = recv();
  T.ok(r, `${what}: a reply`);
  T.equal(r?.unique, unique, `${what}: same unique`);
  T.equal(r?.error, -error, `${what}: error ${error}`);
  return r!;
}

const lookupBody = (name: string) => (w: P.LeWriter) => w.bytes(Buffer.from(`${name}\0`, 'latin1'));
const openBody = (w: P.LeWriter) => w.u32(2).u32(0); // O_RDWR
const writeBody = (fh: number, data: Uint8Array, size = data.length) => (w: P.LeWriter) =>
  w.u64(fh).u64(0).u32(size).u32(0).u64(0).u32(0).u32(0).bytes(data);
const readBody = (fh: number, size: number) => (w: P.LeWriter) => w.u64(fh).u64(0).u32(size).u32(0).u64(0).u32(0).u32(0);
const releaseBody = (fh: number) => (w: P.LeWriter) => w.u64(fh).u32(0).u32(0).u64(0);

t.test('before INIT everything else is EIO', async (t) => {
  T = t;
  const u = send(P.OP.GETATTR, 1, (w) => w.zero(16));
  expectReply(u, ERRNO.EIO!, 'GETATTR before INIT');
  t.pass();
});

t.test('INIT: minor negotiated down to ours, max_write above 4096', async (t) => {
  T = t;
  const u = send(P.OP.INIT, 0, (w) => w.u32(7).u32(38).u32(131072).u32(0xffffffff).u32(0).zero(44));
  const r = expectReply(u, 0, 'INIT');
  t.equal(r.len, P.OUT_HEADER + P.INIT_OUT);
  t.equal(r.payload.u32(), 7);
  t.equal(r.payload.u32(), P.FUSE_OUR_MINOR);
  r.payload.u32();
  t.equal(r.payload.u32(), 1 << 5, 'only BIG_WRITES of the offered flags');
  r.payload.u32();
  t.ok(r.payload.u32() >= 4096, 'max_write');
  const old = send(P.OP.INIT, 0, (w) => w.u32(7).u32(5).u32(0).u32(0));
  expectReply(old, ERRNO.EPROTO!, 'INIT from a too-old kernel');
});

t.test('truncated header is dropped, the loop goes on', async (t) => {
  T = t;
  sendRaw(new Uint8Array(20).fill(7));
  t.equal(recv(200), null, 'no reply: no unique to answer to');
  const u = send(P.OP.STATFS, 1);
  const r = expectReply(u, 0, 'STATFS after the junk');
  t.equal(r.len, P.OUT_HEADER + P.STATFS_OUT);
});

t.test('length field disagreeing with the message, truncated bodies, unknown opcode', async (t) => {
  T = t;
  const bad = new Uint8Array(64);
  const w = new P.LeWriter(bad).u32(999).u32(P.OP.GETATTR).u64(77).u64(1);
  void w;
  sendRaw(bad);
  expectReply(77, ERRNO.EINVAL!, 'len mismatch');
  const u1 = send(P.OP.WRITE, 2, (w) => w.u64(1)); // 8 of the 40 bytes of fuse_write_in
  expectReply(u1, ERRNO.EINVAL!, 'truncated WRITE');
  const u2 = send(P.OP.READ, 2);
  expectReply(u2, ERRNO.EINVAL!, 'READ without fuse_read_in');
  const u3 = send(4242, 1, (w) => w.zero(32));
  expectReply(u3, ERRNO.ENOSYS!, 'unknown opcode');
  const u4 = send(P.OP.IOCTL, 2, (w) => w.zero(32));
  expectReply(u4, ERRNO.ENOTTY!, 'IOCTL');
  send(P.OP.FORGET, 2, (w) => w.u64(1));
  t.equal(recv(100), null, 'FORGET is never answered');
});

t.test('LOOKUP, GETATTR, READDIR', async (t) => {
  T = t;
  const r = expectReply(send(P.OP.LOOKUP, 1, lookupBody('tpm0')), 0, 'LOOKUP tpm0');
  t.equal(r.payload.u64(), 2, 'node id');
  expectReply(send(P.OP.LOOKUP, 1, lookupBody('tpm1')), ERRNO.ENOENT!, 'LOOKUP tpm1');
  expectReply(send(P.OP.LOOKUP, 1, (w) => w.bytes(Buffer.from('tpm0'))), 0, 'LOOKUP without NUL');
  const a = expectReply(send(P.OP.GETATTR, 2, (w) => w.zero(16)), 0, 'GETATTR tpm0');
  a.payload.skip(16 + 8 * 6 + 12);
  t.equal(a.payload.u32(), 0o100600, 'mode 0600 regular file');
  const d = expectReply(send(P.OP.READDIR, 1, readBody(0, 4096)), 0, 'READDIR');
  const names = Buffer.from(buf.subarray(P.OUT_HEADER, d.len)).toString('latin1');
  t.match(names, /tpm0/);
  const d2 = expectReply(send(P.OP.READDIR, 1, readBody(0, 20)), 0, 'READDIR with no room');
  t.equal(d2.len, P.OUT_HEADER, 'nothing that does not fit');
});

t.test('a command through the node: OPEN (direct I/O), WRITE, READ in pieces', async (t) => {
  T = t;
  const o = expectReply(send(P.OP.OPEN, 2, openBody), 0, 'OPEN');
  const fh = o.payload.u64();
  t.equal(fh, 1);
  t.equal(o.payload.u32(), P.FOPEN_DIRECT_IO);
  const cmd = tpm2.getRandom(16);
  const w = expectReply(send(P.OP.WRITE, 2, writeBody(fh, cmd)), 0, 'WRITE');
  t.equal(w.payload.u32(), cmd.length);
  const r1 = expectReply(send(P.OP.READ, 2, readBody(fh, 10)), 0, 'READ header');
  t.equal(r1.len - P.OUT_HEADER, 10);
  const size = Buffer.from(buf).readUInt32BE(P.OUT_HEADER + 2);
  t.equal(Buffer.from(buf).readUInt32BE(P.OUT_HEADER + 6), 0, 'TPM_RC_SUCCESS');
  const r2 = expectReply(send(P.OP.READ, 2, readBody(fh, 4096)), 0, 'READ rest');
  t.equal(r2.len - P.OUT_HEADER, size - 10);
  const r3 = expectReply(send(P.OP.READ, 2, readBody(fh, 4096)), 0, 'READ again');
  t.equal(r3.len, P.OUT_HEADER, 'nothing pending reads 0 bytes');
  const big = new Uint8Array(9000);
  expectReply(send(P.OP.WRITE, 2, writeBody(fh, big)), ERRNO.EINVAL!, 'WRITE larger than max_write');
  expectReply(send(P.OP.WRITE, 2, writeBody(fh, new Uint8Array(100), 5000)), ERRNO.EINVAL!, 'WRITE size beyond its data');
  expectReply(send(P.OP.WRITE, 2, writeBody(fh, new Uint8Array(5000))), ERRNO.E2BIG!, '5000-byte command');
  expectReply(send(P.OP.WRITE, 2, writeBody(fh, new Uint8Array(6))), ERRNO.EINVAL!, 'short command');
  expectReply(send(P.OP.WRITE, 2, writeBody(7, cmd)), ERRNO.EBADF!, 'unknown handle');
  expectReply(send(P.OP.WRITE, 2, writeBody(fh, cmd)), 0, 'the node still works');
  expectReply(send(P.OP.WRITE, 2, writeBody(fh, cmd)), ERRNO.EBUSY!, 'WRITE while a response is unread');
});

t.test('second OPEN waits for the grace: INTERRUPT → EINTR, timeout → EBUSY, RELEASE → opened', async (t) => {
  T = t;
  const u1 = send(P.OP.OPEN, 2, openBody);
  t.equal(recv(GRACE / 3), null, 'parked while the node is taken');
  send(P.OP.INTERRUPT, 0, (w) => w.u64(u1));
  expectReply(u1, ERRNO.EINTR!, 'interrupted OPEN');
  const t0 = performance.now();
  const u2 = send(P.OP.OPEN, 2, openBody);
  expectReply(u2, ERRNO.EBUSY!, 'OPEN after the grace');
  t.ok(performance.now() - t0 >= GRACE - 5, 'EBUSY only after the grace');
  send(P.OP.INTERRUPT, 0, (w) => w.u64(u2)); // for a request already answered: ignored
  t.equal(recv(100), null, 'INTERRUPT is never answered');
  const u3 = send(P.OP.OPEN, 2, openBody);
  const rel = send(P.OP.RELEASE, 2, releaseBody(1));
  expectReply(rel, 0, 'RELEASE');
  const o = expectReply(u3, 0, 'parked OPEN admitted by the RELEASE');
  const fh = o.payload.u64();
  t.equal(fh, 2);
  const r = expectReply(send(P.OP.READ, 2, readBody(fh, 4096)), 0, 'READ');
  t.equal(r.len, P.OUT_HEADER, 'the old opener’s response was dropped');
});

t.test('DESTROY ends the loop; the worker closes its end', async (t) => {
  T = t;
  expectReply(send(P.OP.DESTROY, 0), 0, 'DESTROY');
  const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r('timeout'), 5000))]);
  t.equal(code, 0, 'worker exited');
  t.same(
    messages.filter((m) => m.type === 'end'),
    [{ type: 'end', how: 'destroyed', dropped: 1 }],
  );
  t.same(
    messages.filter((m) => m.type === 'error'),
    [],
  );
  t.equal(sysRead(ours, buf, buf.length), 0, 'peer closed');
});

t.test('a bad backend spec is reported, not a crash', async (t) => {
  T = t;
  const [a, b] = seqpacketPair();
  const w = startWorker(new URL('../../drivers/tpmfront/fuse-raw-worker.ts', import.meta.url), {
    workerData: { fd: b, backend: { module: '/nonexistent/backend.ts', export: 'x', params: null }, stop: new SharedArrayBuffer(4) } satisfies RawWorkerData,
  });
  const got: RawWorkerMessage[] = [];
  w.on('message', (m: RawWorkerMessage) => got.push(m));
  const code = await new Promise((r) => w.once('exit', r));
  sysClose(a);
  t.equal(code, 0);
  t.match(got, [{ type: 'error', message: /cannot import backend module/ }], 'a bad backend spec is reported, not a crash');
});

t.test('the peer closing its end stops the loop cleanly', async (t) => {
  T = t;
  const [a, b] = seqpacketPair();
  const w = startWorker(new URL('../../drivers/tpmfront/fuse-raw-worker.ts', import.meta.url), {
    workerData: { fd: b, backend: engineBackendSpec({ version: '2.0' }), stop: new SharedArrayBuffer(4) } satisfies RawWorkerData,
  });
  const got: RawWorkerMessage[] = [];
  w.on('message', (m: RawWorkerMessage) => got.push(m));
  const exit = new Promise((r) => w.once('exit', r));
  await new Promise((r) => setTimeout(r, 300)); // let it block in read(2)
  sysClose(a);
  const code = await Promise.race([exit, new Promise((r) => setTimeout(() => r('timeout'), 5000))]);
  t.equal(code, 0);
  t.same(got, [{ type: 'end', how: 'closed', dropped: 0 }]);
});
