// fuse-native's own floor for the datapath benchmark: a minimal tpm0 that answers every
// write with a canned GetRandom response (no TPM, no shared page), mounted with direct_io.
// Runs as a child process so its JavaScript thread is not the benchmark's.
//   tsx scripts/bench/support/canned-node.ts MOUNTPOINT   (prints "ready" once mounted)

import { directIoFuse, type FuseCb } from '../../../drivers/tpmfront/fuse-native-binding.ts';

type Cb = FuseCb;

const canned = Buffer.from('80010000001c0000000000102f8e3a8c05d6a4ea5ac3b0b39eab2ac8', 'hex');
let pending = false;
const mnt = process.argv[2]!;
const now = new Date();
const fileStat = { mtime: now, atime: now, ctime: now, nlink: 1, size: 0, mode: 0o100600, uid: 0, gid: 0 };
const ops = {
  readdir: (_p: string, cb: Cb) => cb(0, ['tpm0']),
  getattr: (p: string, cb: Cb) => (p === '/' ? cb(0, { ...fileStat, mode: 0o40700, nlink: 2 }) : p === '/tpm0' ? cb(0, fileStat) : cb(-2)),
  open: (_p: string, _f: number, cb: Cb) => cb(0, 1),
  release: (_p: string, _fd: number, cb: Cb) => cb(0),
  truncate: (_p: string, _s: number, cb: Cb) => cb(0),
  write: (_p: string, _fd: number, buf: Buffer, len: number, _pos: number, cb: Cb) => {
    pending = true;
    cb(len);
  },
  read: (_p: string, _fd: number, buf: Buffer, _len: number, _pos: number, cb: Cb) => {
    if (!pending) return cb(0);
    pending = false;
    canned.copy(buf);
    cb(canned.length);
  },
};
const fuse = directIoFuse(mnt, ops, { force: true, mkdir: true });
fuse.mount((err) => {
  if (err) {
    console.error(`canned node: ${err.message}`);
    process.exit(1);
  }
  console.log('ready');
});
const stop = () => fuse.unmount(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
