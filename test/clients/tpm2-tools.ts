// tpm2-tools driven against one TCTI, as small reusable operations (PCR, NV, persistent
// key) for the battery and for other tests ("state survives stop/start", "two guests").
// No resource manager sits behind a raw tpm0, so every operation that loads objects or
// starts sessions flushes them before it returns.

import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mustRun, runTool, scratchDir, type Tap, type ToolResult } from './run.ts';

export interface Tpm2ToolsOptions {
  /** per tool invocation; RSA key generation in an emulator can take seconds */
  timeoutMs?: number;
  /** The TCTI is a resource manager's (tpmrm0): flush() then leaves saved sessions alone —
   *  session handles are not virtualised (Linux' neither), so `flushcontext -s` would end
   *  other clients' sessions; our own session files are flushed by the steps using them. */
  resourceManager?: boolean;
}

const hex = (n: number): string => '0x' + n.toString(16);

export function sha256(...parts: Buffer[]): Buffer {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
}

/** Parse the handle list printed by `tpm2_getcap handles-*` ("- 0x81000016" lines). */
export function parseHandles(yaml: string): number[] {
  return [...yaml.matchAll(/^-\s*(0x[0-9a-fA-F]+)\s*$/gm)].map((m) => parseInt(m[1]!, 16));
}

export class Tpm2Tools {
  readonly tcti: string;
  readonly dir: string;
  readonly timeoutMs: number;
  private seq = 0;

  constructor(tcti: string, dir: string, opts: Tpm2ToolsOptions = {}) {
    this.tcti = tcti;
    this.dir = dir;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.resourceManager = opts.resourceManager ?? false;
  }
  readonly resourceManager: boolean;

  /** A fresh file name in the working dir (files are never reused between operations). */
  file(name: string): string {
    return join(this.dir, `${++this.seq}-${name}`);
  }

  writeFile(name: string, data: Buffer | string): string {
    const p = this.file(name);
    writeFileSync(p, data, { mode: 0o600 });
    return p;
  }

  /** Run tpm2_<tool> with -T; exit 0 required. */
  run(tool: string, args: string[]): Promise<ToolResult> {
    return mustRun(`tpm2_${tool}`, ['-T', this.tcti, ...args], { cwd: this.dir, timeoutMs: this.timeoutMs });
  }

  /** Run tpm2_<tool> with -T; the caller judges the exit code. */
  try(tool: string, args: string[]): Promise<ToolResult> {
    return runTool(`tpm2_${tool}`, ['-T', this.tcti, ...args], { cwd: this.dir, timeoutMs: this.timeoutMs });
  }

  /** Flush every transient object and every saved session (behind a resource manager:
   *  the objects of this client's space only). */
  async flush(): Promise<void> {
    await this.run('flushcontext', ['-t']);
    if (!this.resourceManager) await this.run('flushcontext', ['-s']);
  }

  /** Flush one session (or object) saved in a context file; false if it was gone already. */
  async flushFile(ctx: string): Promise<boolean> {
    return (await this.try('flushcontext', [ctx])).code === 0;
  }

  async handles(kind: 'transient' | 'persistent' | 'nv-index' | 'loaded-session'): Promise<number[]> {
    return parseHandles((await this.run('getcap', [`handles-${kind}`])).stdout);
  }

  async getRandom(n: number): Promise<Buffer> {
    const out = this.file('random.bin');
    await this.run('getrandom', ['-o', out, String(n)]);
    return readFileSync(out);
  }

  /** The SHA-256 bank's value of one PCR. */
  async pcrRead(pcr: number): Promise<Buffer> {
    const out = this.file(`pcr${pcr}.bin`);
    await this.run('pcrread', [`sha256:${pcr}`, '-o', out]);
    return readFileSync(out);
  }

  /** Extend the SHA-256 bank of one PCR with a 32-byte digest. */
  async pcrExtend(pcr: number, digest: Buffer): Promise<void> {
    if (digest.length !== 32) throw new Error(`pcrExtend needs a 32-byte digest, got ${digest.length}`);
    await this.run('pcrextend', [`${pcr}:sha256=${digest.toString('hex')}`]);
  }

  /** Define (owner auth, no password) an NV index sized for data, unless it exists, and write data. */
  async nvWrite(index: number, data: Buffer): Promise<void> {
    if (!(await this.handles('nv-index')).includes(index)) {
      await this.run('nvdefine', [hex(index), '-C', 'o', '-s', String(data.length), '-a', 'ownerread|ownerwrite|authread|authwrite']);
    }
    await this.run('nvwrite', [hex(index), '-C', 'o', '-i', this.writeFile('nv.in', data)]);
  }

  async nvRead(index: number, size: number): Promise<Buffer> {
    const out = this.file('nv.out');
    await this.run('nvread', [hex(index), '-C', 'o', '-s', String(size), '-o', out]);
    return readFileSync(out);
  }

  async nvUndefine(index: number): Promise<void> {
    await this.run('nvundefine', [hex(index), '-C', 'o']);
  }

  /** Create an owner-hierarchy primary key; returns its context file and its name. */
  async createPrimary(alg: 'rsa2048' | 'ecc256' = 'rsa2048'): Promise<{ ctx: string; name: Buffer }> {
    const ctx = this.file('primary.ctx');
    await this.run('createprimary', ['-C', 'o', '-G', alg, '-c', ctx, '-Q']);
    const name = await this.readName(ctx);
    await this.flush();
    return { ctx, name };
  }

  /** The object's name (nameAlg || digest of its public area) read back from the TPM. */
  async readName(objectRef: string): Promise<Buffer> {
    const out = this.file('name.bin');
    await this.run('readpublic', ['-c', objectRef, '-n', out, '-Q']);
    return readFileSync(out);
  }

  /**
   * Persist a fresh primary key at handle (evicting a leftover there first); returns its
   * name so a later readPersistent (e.g. after a guest restart) can check it is the same key.
   */
  async persistKey(handle: number, alg: 'rsa2048' | 'ecc256' = 'ecc256'): Promise<Buffer> {
    if ((await this.handles('persistent')).includes(handle)) await this.evict(handle);
    const { ctx, name } = await this.createPrimary(alg);
    await this.run('evictcontrol', ['-C', 'o', '-c', ctx, hex(handle)]);
    await this.flush();
    return name;
  }

  /** The name of the key at a persistent handle, or null when nothing is there. */
  async readPersistent(handle: number): Promise<Buffer | null> {
    if (!(await this.handles('persistent')).includes(handle)) return null;
    return this.readName(hex(handle));
  }

  async evict(handle: number): Promise<void> {
    await this.run('evictcontrol', ['-C', 'o', '-c', hex(handle)]);
  }
}

/** A client with its own scratch working dir, removed on the test's teardown. */
export function tpm2Tools(t: Tap, tcti: string, opts: Tpm2ToolsOptions = {}): Tpm2Tools {
  return new Tpm2Tools(tcti, scratchDir(t, 'tpm2'), opts);
}
