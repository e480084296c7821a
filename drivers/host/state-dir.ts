// A directory of state blobs (a vTPM's, or the emulated chip's NVRAM): one file per libtpms blob. Each write
// is a temp file, fsync, rename, fsync of the directory, so a crash leaves the old blob or
// the new one, never half of one. Files 0600, the directory 0700: the blobs hold secrets.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { VtpmError } from '../base/errors.ts';
import type { StateStore } from '../tpm/engine.ts';

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const MAX_BLOB = 1 << 20;

export class DirStateStore implements StateStore {
  constructor(readonly dir: string) {
    try {
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
      fs.chmodSync(dir, 0o700);
    } catch (e) {
      throw new VtpmError('ESTATE', `cannot prepare state dir ${dir}`, { cause: e });
    }
  }

  private file(name: string): string {
    if (!NAME.test(name)) throw new VtpmError('EINVAL', `state blob name ${JSON.stringify(name)} is not a plain file name`);
    return path.join(this.dir, name);
  }

  load(name: string): Uint8Array | undefined {
    return readBounded(this.file(name), MAX_BLOB, 'state blob');
  }

  store(name: string, data: Uint8Array): void {
    const f = this.file(name);
    if (data.length > MAX_BLOB) throw new VtpmError('EOVERSIZE', `state blob of ${data.length} bytes exceeds ${MAX_BLOB}`);
    try {
      writeFileAtomic(f, data);
    } catch (e) {
      throw new VtpmError('ESTATE', `cannot store state blob ${f}`, { cause: e });
    }
  }

  delete(name: string): void {
    const f = this.file(name);
    try {
      fs.unlinkSync(f);
      this.syncDir();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new VtpmError('ESTATE', `cannot delete state blob ${f}`, { cause: e });
    }
  }

  private syncDir(): void {
    syncDir(this.dir);
  }
}

/** fsync a directory, so a rename or unlink in it survives a crash. */
export function syncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** The bytes of `file`, or undefined when it does not exist. A file larger than `max`,
 *  a link, or anything but a regular file is refused (EINTEGRITY: not a file we wrote)
 *  before a byte is read; a failing file system is ESTATE with its error as the cause. */
export function readBounded(file: string, max: number, what: string): Buffer | undefined {
  let fd: number;
  try {
    // NONBLOCK: a FIFO put in the file's place must not hang the reader in open().
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return undefined;
    if (code === 'ELOOP') throw new VtpmError('EINTEGRITY', `${what} (${file}) is a symbolic link, not a file the manager wrote`, { cause: e });
    throw new VtpmError('ESTATE', `cannot open ${what} (${file})`, { cause: e });
  }
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new VtpmError('EINTEGRITY', `${what} (${file}) is not a regular file`);
    if (st.size > max) throw new VtpmError('EINTEGRITY', `${what} (${file}) is ${st.size} bytes, more than the ${max} the manager ever writes`);
    const buf = Buffer.allocUnsafe(st.size);
    let off = 0;
    while (off < st.size) {
      const n = fs.readSync(fd, buf, off, st.size - off, off);
      if (n === 0) throw new VtpmError('EINTEGRITY', `${what} (${file}) shrank while it was read`);
      off += n;
    }
    return buf;
  } catch (e) {
    if (e instanceof VtpmError) throw e;
    throw new VtpmError('ESTATE', `cannot read ${what} (${file})`, { cause: e });
  } finally {
    fs.closeSync(fd);
  }
}

/** Replace `file` with `data` so that a crash leaves the old content or the new, never
 *  half of one: temp file (0600), fsync, rename, fsync of the directory. */
export function writeFileAtomic(file: string, data: Uint8Array): void {
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    const fd = fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o600);
    try {
      // A nearly full file system writes short: loop, so the next write fails with ENOSPC
      // instead of a cut-off file being renamed over the good one.
      for (let off = 0; off < data.length; ) off += fs.writeSync(fd, data, off, data.length - off);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    syncDir(path.dirname(file));
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw e;
  }
}
