// A blob's two slot files, rewritten in place alternately (A/B, as firmware and databases
// do) so that a save is one pwrite + fdatasync: no temp file, no rename, no directory
// fsync, and on the common path no size change (so fdatasync commits no metadata).
//
//   D/instances/<uuid>/<name>     slot 0 (the one-file layout's path: such a file reads as slot 0)
//   D/instances/<uuid>/<name>@1   slot 1 ('@' is not allowed in a blob name)
//
// A slot file is  "vSL1" | u32 BE record length | record | zeros  up to the file's size,
// where the record is the sealed CBOR envelope the blob store writes (its version is in
// the AAD). A writer only ever rewrites the slot that does not hold the newest version, so
// a crash mid-write tears only that slot (never acknowledged) and the other still opens.
// Anything wrong with a slot's bytes (magic, length, non-zero padding) is EINTEGRITY.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { VtpmError } from '../../drivers/base/errors.ts';
import { syncDir } from '../../drivers/host/state-dir.ts';
import { stateWriteError } from './sealed-file.ts';

export type Slot = 0 | 1;
export const SLOTS: readonly Slot[] = [0, 1];
const MAGIC = Buffer.from('vSL1', 'latin1');
const HEADER = MAGIC.length + 4;
const PAGE = 4096;

export function slotFile(dir: string, name: string, slot: Slot): string {
  return path.join(dir, slot === 0 ? name : `${name}@1`);
}

/** The size a slot file is given when it is created or must grow: the frame, 1/8 more
 *  (min 256 B) so a blob that grows a little still fits, rounded up to pages, at most `max`. */
function capacity(frameLen: number, max: number): number {
  return Math.min(max, Math.ceil((frameLen + Math.max(256, frameLen >> 3)) / PAGE) * PAGE);
}

/** The record in a slot file's bytes. A file without the magic is a one-file-layout blob
 *  (a bare record), accepted in slot 0 only. */
export function slotRecord(bytes: Buffer, slot: Slot, what: string): Buffer {
  if (bytes.length < HEADER || !bytes.subarray(0, MAGIC.length).equals(MAGIC)) {
    if (slot === 0) return bytes;
    throw new VtpmError('EINTEGRITY', `${what}: not a slot file (no slot header)`);
  }
  const len = bytes.readUInt32BE(MAGIC.length);
  if (len > bytes.length - HEADER) throw new VtpmError('EINTEGRITY', `${what}: a record of ${len} bytes in a slot of ${bytes.length - HEADER} (torn or truncated)`);
  const end = HEADER + len;
  for (let i = end; i < bytes.length; i++) {
    if (bytes[i] !== 0) throw new VtpmError('EINTEGRITY', `${what}: non-zero bytes after the record (torn or altered)`);
  }
  return bytes.subarray(HEADER, end);
}

/** Rewrite slot file `file` with `record`, durably. In place, with fdatasync, when the
 *  record fits the file's size; otherwise (a new slot, a blob that outgrew its slot, or one
 *  that now needs under a quarter of it) the file is given a new size, written whole, and
 *  fully fsynced. Growing in place is safe because this slot never holds the newest
 *  version: a crash while it grows tears only this slot, and the other still opens; a new
 *  pair written elsewhere would need a rename and a directory fsync to switch over. A slot
 *  created here also fsyncs the directory (once per slot file); one that failed to be
 *  filled is removed (a crash mid-way leaves it torn: what the next write rewrites). ESTATE on failure
 *  (cause kept: ENOSPC when a new or growing slot finds no free blocks). */
export function writeSlot(file: string, record: Uint8Array, maxSize: number, what: string): void {
  const frameLen = HEADER + record.length;
  if (frameLen > maxSize) throw new VtpmError('EOVERSIZE', `${what}: a record of ${record.length} bytes does not fit a slot of ${maxSize}`);
  let created = false;
  try {
    let fd: number;
    const flags = fs.constants.O_WRONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK;
    try {
      fd = fs.openSync(file, flags);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      fd = fs.openSync(file, flags | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
      created = true;
    }
    try {
      const st = fs.fstatSync(fd);
      if (!st.isFile()) throw new VtpmError('EINTEGRITY', `${what} (${file}) is not a regular file`);
      const want = capacity(frameLen, maxSize);
      const size = st.size < frameLen || (st.size > 4 * want && st.size > 16 * PAGE) ? want : st.size;
      const buf = Buffer.alloc(size);
      MAGIC.copy(buf, 0);
      buf.writeUInt32BE(record.length, MAGIC.length);
      buf.set(record, HEADER);
      // A nearly full file system writes short: loop, so the next write reports ENOSPC.
      for (let off = 0; off < size; ) off += fs.writeSync(fd, buf, off, size - off, off);
      if (size === st.size) {
        fs.fdatasyncSync(fd);
      } else {
        if (size < st.size) fs.ftruncateSync(fd, size);
        fs.fsyncSync(fd);
      }
    } finally {
      fs.closeSync(fd);
    }
    if (created) syncDir(path.dirname(file));
  } catch (e) {
    // A slot this write created and could not fill held nothing acknowledged: it goes, so
    // the blob reads as absent (as before the write) rather than as a damaged file.
    if (created) fs.rmSync(file, { force: true });
    if (e instanceof VtpmError) throw e;
    throw stateWriteError(e, what, file);
  }
}
