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
    const f = this.file(name);
    let fd: number;
    try {
      fd = fs.openSync(f, 'r');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new VtpmError('ESTATE', `cannot open state blob ${f}`, { cause: e });
    }
    try {
      const size = fs.fstatSync(fd).size;
      if (size > MAX_BLOB) throw new VtpmError('EOVERSIZE', `state blob ${f} of ${size} bytes exceeds ${MAX_BLOB}`);
      const buf = new Uint8Array(size);
      let off = 0;
      while (off < size) {
        const n = fs.readSync(fd, buf, off, size - off, off);
        if (n === 0) throw new VtpmError('ETRUNC', `state blob ${f} shrank while read`);
        off += n;
      }
      return buf;
    } catch (e) {
      if (e instanceof VtpmError) throw e;
      throw new VtpmError('ESTATE', `cannot read state blob ${f}`, { cause: e });
    } finally {
      fs.closeSync(fd);
    }
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
