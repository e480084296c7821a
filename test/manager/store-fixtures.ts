// Shared by the state-store tests: a scratch state dir, walking its files, damaging one,
// and a tiny tmpfs to fill.
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import type { Test } from 'tap';
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
