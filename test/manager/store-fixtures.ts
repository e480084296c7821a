// Shared by the state-store tests: a scratch state dir, walking its files, damaging one,
// a tiny tmpfs to fill, and a blob's two slot files (snapshot, put back, which is newest).
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import type { Test } from 'tap';
import { decode } from 'cbor-x';
import { slotFile, slotRecord } from '../../manager/store/slot-file.ts';
import { isVtpmError, type VtpmErrorCode } from '../../drivers/base/errors.ts';

export function stateDir(t: Test, prefix = 'store'): string {
  const dir = fs.mkdtempSync(join(tmpdir(), `vtpm-${prefix}-`));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return join(dir, 'D');
}

/** Every path below `dir` (files and directories), depth first. */
export function walk(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    out.push(p);
    if (e.isDirectory()) out.push(...walk(p));
  }
  return out;
}

export function mode(p: string): number {
  return fs.statSync(p).mode & 0o777;
}

export function flipByte(file: string, at: number): void {
  const b = fs.readFileSync(file);
  b[at]! ^= 0x01;
  fs.writeFileSync(file, b);
}

/** Run `fn` and check it throws a VtpmError with `code`; returns that error. */
export function throwsCode(t: Test, fn: () => unknown, code: VtpmErrorCode, msg: string): Error | undefined {
  try {
    fn();
  } catch (e) {
    t.ok(isVtpmError(e, code), `${msg}: ${code}`, isVtpmError(e) ? { found: `${e.code}: ${e.message}` } : { found: e });
    return e as Error;
  }
  t.fail(`${msg}: ${code} expected, nothing thrown`);
  return undefined;
}

/** Mount a tmpfs of `size` at a new dir (unmounted in teardown). */
export function tinyTmpfs(t: Test, size: string): string {
  const dir = fs.mkdtempSync(join(tmpdir(), 'vtpm-tmpfs-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tmpfs', dir]);
  t.teardown(() => {
    execFileSync('umount', [dir]);
    fs.rmdirSync(dir);
  });
  return dir;
}

/** Fill the file system holding `dir` with `dir/fill` until ENOSPC; returns its size. */
export function fill(dir: string): number {
  const fd = fs.openSync(join(dir, 'fill'), 'w');
  const chunk = Buffer.alloc(1024, 0x55);
  let total = 0;
  try {
    for (;;) total += fs.writeSync(fd, chunk);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOSPC') throw e;
  } finally {
    fs.closeSync(fd);
  }
  return total;
}

/** The two slot files of blob `name` in an instance dir (slot 0, slot 1). */
export function slotFiles(dir: string, name: string): [string, string] {
  return [slotFile(dir, name, 0), slotFile(dir, name, 1)];
}

/** Blob `name`'s slot files as they are now (undefined: absent), to put back later. */
export function snapshot(dir: string, name: string): Map<string, Buffer | undefined> {
  return new Map(slotFiles(dir, name).map((f) => [f, fs.existsSync(f) ? fs.readFileSync(f) : undefined]));
}

/** Put a snapshot back: every slot file as it was, absent ones removed. */
export function restore(snap: Map<string, Buffer | undefined>): void {
  for (const [f, bytes] of snap) {
    if (bytes) fs.writeFileSync(f, bytes, { mode: 0o600 });
    else fs.rmSync(f, { force: true });
  }
}

/** The plaintext envelope fields (version, deleted...) of a slot file, read without the key. */
export function slotEnvelope(file: string, slot: 0 | 1): { version: number; deleted?: boolean; ct: Uint8Array } {
  return decode(slotRecord(fs.readFileSync(file), slot, file)) as { version: number; deleted?: boolean; ct: Uint8Array };
}

type Envelope = ReturnType<typeof slotEnvelope>;

/** Blob `name`'s newest slot (by the envelopes' versions): its file and envelope, or undefined. */
export function newestSlot(dir: string, name: string): { file: string; env: Envelope } | undefined {
  let best: { file: string; env: Envelope } | undefined;
  slotFiles(dir, name).forEach((file, slot) => {
    if (!fs.existsSync(file)) return;
    const env = slotEnvelope(file, slot as 0 | 1);
    if (!best || env.version > best.env.version) best = { file, env };
  });
  return best;
}

/** The slot file holding blob `name`'s newest version, or undefined. */
export function newestSlotFile(dir: string, name: string): string | undefined {
  return newestSlot(dir, name)?.file;
}
