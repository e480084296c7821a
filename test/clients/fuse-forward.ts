// A minimal tpm0 in FUSE that forwards each command to a TPM on TCP (swtpm) — test
// plumbing only, so the TPM 1.2 battery's namespace path (tcsd opening a FUSE file
// bind-mounted at /dev/tpm0) can be proven on a reference TPM while no CUSE exists here.
// It keeps just enough of tpm-dev: a write carries one command and returns once the
// response is in (fuse-native has no poll), the next reads drain the response, direct I/O.

import { mkdirSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { directIoFuse, Fuse, type FuseCb } from '../../drivers/tpmfront/fuse-native-binding.ts';
import { scratchDir, type Tap } from './run.ts';

type Cb = FuseCb;

/** One TCP connection to the TPM; one command in flight (tpm-dev allows no more). */
class TcpTpm {
  private sock: Socket | null = null;
  constructor(private host: string, private port: number) {}
  private open(): Promise<Socket> {
    if (this.sock && !this.sock.destroyed) return Promise.resolve(this.sock);
    return new Promise((resolve, reject) => {
      const s = connect({ host: this.host, port: this.port });
      s.once('connect', () => resolve((this.sock = s)));
      s.once('error', reject);
    });
  }
  async transmit(cmd: Buffer): Promise<Buffer> {
    const s = await this.open();
    return new Promise((resolve, reject) => {
      let got = Buffer.alloc(0);
      const onData = (b: Buffer): void => {
        got = Buffer.concat([got, b]);
        if (got.length >= 6 && got.length >= got.readUInt32BE(2)) done(null, got.subarray(0, got.readUInt32BE(2)));
      };
      const onErr = (e: Error): void => done(e);
      const onClose = (): void => done(new Error('TPM connection closed'));
      const done = (e: Error | null, r?: Buffer): void => {
        s.off('data', onData).off('error', onErr).off('close', onClose);
        if (e) reject(e);
        else resolve(r!);
      };
      s.on('data', onData).on('error', onErr).on('close', onClose);
      s.write(cmd);
    });
  }
  close(): void {
    this.sock?.destroy();
  }
}

export interface ForwardNode {
  /** path of the tpm0 node */
  path: string;
}

export async function mountForwardNode(t: Tap, tpm: { host: string; port: number }): Promise<ForwardNode> {
  const mnt = join(scratchDir(t, 'fwd'), 'dev');
  mkdirSync(mnt, { mode: 0o700 });
  const backend = new TcpTpm(tpm.host, tpm.port);
  let opener = 0; // file handle of the one opener, 0 = none (fuse-native treats fd 0 as none)
  let nextFd = 1;
  let pending: Buffer | null = null;
  const now = new Date();
  const ops = {
    readdir: (path: string, cb: Cb) => (path === '/' ? cb(0, ['tpm0']) : cb(Fuse.ENOENT)),
    getattr: (path: string, cb: Cb) => {
      if (path === '/') return cb(0, { mtime: now, atime: now, ctime: now, mode: 0o40700, size: 0, uid: 0, gid: 0, nlink: 2 });
      if (path === '/tpm0') return cb(0, { mtime: now, atime: now, ctime: now, mode: 0o100600, size: 0, uid: 0, gid: 0, nlink: 1 });
      return cb(Fuse.ENOENT);
    },
    open: (path: string, _flags: number, cb: Cb) => {
      if (path !== '/tpm0') return cb(Fuse.ENOENT);
      if (opener) return cb(Fuse.EBUSY);
      opener = nextFd++;
      pending = null;
      cb(0, opener);
    },
    release: (_path: string, fd: number, cb: Cb) => {
      if (fd === opener) opener = 0;
      cb(0);
    },
    truncate: (_path: string, _size: number, cb: Cb) => cb(0),
    write: (_path: string, _fd: number, buf: Buffer, len: number, _pos: number, cb: Cb) => {
      const cmd = Buffer.from(buf.subarray(0, len)); // fuse-native reuses buf
      if (len < 10 || cmd.readUInt32BE(2) !== len) return cb(Fuse.EINVAL);
      if (pending) return cb(Fuse.EBUSY);
      backend.transmit(cmd).then(
        (rsp) => {
          pending = rsp;
          cb(len);
        },
        () => cb(Fuse.EIO),
      );
    },
    read: (_path: string, _fd: number, buf: Buffer, len: number, _pos: number, cb: Cb) => {
      if (!pending) return cb(0);
      const n = Math.min(len, pending.length);
      pending.copy(buf, 0, 0, n);
      pending = n < pending.length ? pending.subarray(n) : null;
      cb(n);
    },
  };
  const fuse = directIoFuse(mnt, ops, { force: true });
  await new Promise<void>((resolve, reject) => fuse.mount((e) => (e ? reject(e) : resolve())));
  t.teardown(async () => {
    backend.close();
    await new Promise<void>((resolve) => fuse.unmount(() => resolve()));
  });
  return { path: join(mnt, 'tpm0') };
}
