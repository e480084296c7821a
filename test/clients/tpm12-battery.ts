// The TPM 1.2 acceptance battery: real tpm-tools through a real tcsd, one t.test per
// step. tpm-tools read passwords from the terminal; CI has none, so only the well-known
// secret flags are used (-y owner, -z SRK/data) and stdin is closed.
// Takes ownership, so it needs an unowned TPM (a fresh guest); it releases its NV index.

import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ToolFailed, describe, mustRun, runTool, type Tap, type ToolResult } from './run.ts';
import { startTcsd, type Tcsd, type TcsdDevice } from './tcsd.ts';

export interface Tpm12BatteryOptions {
  timeoutMs?: number;
  nvIndex?: number;
  /**
   * A TPM 1.2 fresh from libtpms has no endorsement key, and TakeOwnership needs one.
   * 'if-missing' (default) runs tpm_createek then, and says so in a comment; 'never'
   * makes a missing EK a failure (for a node whose vTPM is meant to ship with an EK).
   */
  createEk?: 'if-missing' | 'never';
}

export class Tpm12Tools {
  readonly tcsd: Tcsd;
  readonly timeoutMs: number;
  private seq = 0;
  constructor(tcsd: Tcsd, timeoutMs: number) {
    this.tcsd = tcsd;
    this.timeoutMs = timeoutMs;
  }
  file(name: string): string {
    return join(this.tcsd.clientDir, `${++this.seq}-${name}`);
  }
  writeFile(name: string, data: Buffer): string {
    const p = this.file(name);
    writeFileSync(p, data, { mode: 0o600 });
    return p;
  }
  run(tool: string, args: string[]): Promise<ToolResult> {
    return mustRun(tool, args, { cwd: this.tcsd.clientDir, env: this.tcsd.clientEnv, timeoutMs: this.timeoutMs });
  }
  try(tool: string, args: string[]): Promise<ToolResult> {
    return runTool(tool, args, { cwd: this.tcsd.clientDir, env: this.tcsd.clientEnv, timeoutMs: this.timeoutMs });
  }
}

/** The EK modulus printed by tpm_getpubek ("Public Key:" then groups of 8 hex digits). */
export function parsePubek(out: string): string | null {
  const at = out.indexOf('Public Key:');
  if (at < 0) return null;
  const groups = out.slice(at + 'Public Key:'.length).match(/\b[0-9a-f]{8}\b/g);
  return groups ? groups.join('') : null;
}

const hex = (n: number): string => '0x' + n.toString(16).padStart(8, '0');

export async function runTpm12Battery(t: Tap, device: string | TcsdDevice, opts: Tpm12BatteryOptions = {}): Promise<void> {
  const nvIndex = opts.nvIndex ?? 0x00011000;
  const tcsd = await startTcsd(t, typeof device === 'string' ? { node: device } : device);
  const tools = new Tpm12Tools(tcsd, opts.timeoutMs ?? 30_000);
  let ek: string | null = null;

  // A failing tool's transcript, and tcsd's own log, go to the failing step's diagnostics.
  const step = (name: string, fn: (t: Tap) => Promise<void>): Promise<unknown> =>
    t.test(name, async (st) => {
      try {
        await fn(st);
      } catch (e) {
        if (e instanceof ToolFailed) {
          st.fail(`${name}: tool failed`, { diagnostic: true, transcript: describe(e.result), tcsd: tcsd.log() });
        } else throw e;
      }
    });

  await step('tpm_version', async (t) => {
    const r = await tools.run('tpm_version', []);
    t.match(r.stdout, /TPM 1\.2 Version Info:/, 'a TPM 1.2 answers');
    t.match(r.stdout, /Chip Version:\s+1\.2\.\d+\.\d+/, 'chip version 1.2.x.y');
    t.match(r.stdout, /TPM Vendor ID:\s+\S+/, 'vendor id present');
  });

  await step('tpm_selftest', async (t) => {
    const r = await tools.run('tpm_selftest', []);
    t.match(r.stdout, /TPM Test Results:\s*[0-9a-f]{8}/, 'self-test results returned');
    t.notMatch(r.stdout + r.stderr, /failed/i, 'no failure reported');
  });

  await step('endorsement key present (tpm_getpubek before ownership)', async (t) => {
    let r = await tools.try('tpm_getpubek', []);
    if (r.code !== 0 && /No EK/.test(r.stdout + r.stderr)) {
      if (opts.createEk === 'never') {
        t.fail('the TPM has no endorsement key', { transcript: describe(r) });
        return;
      }
      t.comment('the TPM has no endorsement key: creating one with tpm_createek');
      await tools.run('tpm_createek', []);
      r = await tools.try('tpm_getpubek', []);
    }
    if (r.code !== 0) throw new ToolFailed(r);
    ek = parsePubek(r.stdout);
    t.equal(ek?.length, 512, 'a 2048-bit EK modulus is printed');
    t.match(r.stdout, /Key Size:\s+2048 bits/, 'key size 2048');
  });

  await step('tpm_takeownership -y -z', async (t) => {
    await tools.run('tpm_takeownership', ['-y', '-z']);
    const again = await tools.try('tpm_takeownership', ['-y', '-z']);
    t.not(again.code, 0, 'a second takeownership is refused');
    // trousers first reads the EK with TPM_ReadPubek, which TakeOwnership disabled (code 8);
    // a TPM that still allowed it must refuse with TPM_OWNER_SET (0x14)
    t.match(again.stdout + again.stderr, /code=(0008|0014)/, 'refused because the TPM is owned now');
  });

  await step('tpm_nvdefine, tpm_nvwrite, tpm_nvread round trip', async (t) => {
    const content = randomBytes(32);
    await tools.run('tpm_nvdefine', ['-i', hex(nvIndex), '-s', String(content.length), '-p', 'OWNERREAD|OWNERWRITE', '-y']);
    const info = await tools.run('tpm_nvinfo', ['-i', hex(nvIndex)]);
    t.match(info.stdout, /Permissions\s*:\s*0x00020002 \(OWNERREAD\|OWNERWRITE\)/, 'permissions as defined');
    t.match(info.stdout, /Size\s*:\s*32 \(0x20\)/, 'size as defined');
    await tools.run('tpm_nvwrite', ['-i', hex(nvIndex), '-f', tools.writeFile('nv.in', content), '-z']);
    const out = tools.file('nv.out');
    await tools.run('tpm_nvread', ['-i', hex(nvIndex), '-s', String(content.length), '-f', out, '-z']);
    t.equal(readFileSync(out).toString('hex'), content.toString('hex'), 'tpm_nvread returns what tpm_nvwrite wrote');
    await tools.run('tpm_nvrelease', ['-i', hex(nvIndex), '-y']);
    const after = await tools.try('tpm_nvinfo', ['-i', hex(nvIndex)]);
    t.notMatch(after.stdout, /Size\s*:/, 'index gone after tpm_nvrelease');
  });

  await step('tpm_sealdata, tpm_unsealdata round trip', async (t) => {
    const secret = randomBytes(100);
    const sealed = tools.file('sealed');
    // sealed to PCR 0 too, so the TPM's PCR-bound seal path runs, not only the SRK
    await tools.run('tpm_sealdata', ['-i', tools.writeFile('secret', secret), '-o', sealed, '-z', '-p', '0']);
    const blob = readFileSync(sealed, 'utf8');
    t.match(blob, /-----BEGIN TSS-----/, 'sealed blob written');
    t.notOk(blob.includes(secret.toString('base64')), 'sealed blob does not carry the secret in clear');
    const out = tools.file('unsealed');
    await tools.run('tpm_unsealdata', ['-i', sealed, '-o', out, '-z']);
    t.equal(readFileSync(out).toString('hex'), secret.toString('hex'), 'unsealed content is the secret');
  });

  await step('tpm_getpubek (owner-authorised after ownership)', async (t) => {
    const r = await tools.run('tpm_getpubek', ['-z']);
    const after = parsePubek(r.stdout);
    t.equal(after?.length, 512, 'a 2048-bit EK modulus is printed');
    t.equal(after, ek, 'the same EK as read before ownership');
  });
}
