// A host for guest tests, driven through the `vtpm` CLI as a user would: a private host
// dir, guests started and stopped by the CLI, everything stopped and removed at the end.
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Test } from 'tap';

const VTPM = join(import.meta.dirname, '../../scripts/vtpm.sh');

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run the CLI as a user would: without the test runner's NODE_OPTIONS (tap's process
 *  tracking puts it back into every spawn's environment, hence env -u), plus `env`. */
export function vtpm(args: string[], timeoutMs = 60_000, env: Record<string, string> = {}): Promise<CliResult> {
  const assign = Object.entries(env).map(([k, v]) => `${k}=${v}`);
  return new Promise((resolve) => {
    execFile('/usr/bin/env', ['-u', 'NODE_OPTIONS', ...assign, VTPM, ...args], { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

export class TestHost {
  readonly dir: string;
  constructor(t: Test) {
    this.dir = mkdtempSync(join(tmpdir(), 'vtpm-host-'));
    t.teardown(async () => {
      const r = await vtpm(['host', 'stop', '--dir', this.dir]);
      if (r.code !== 0) t.comment(`host stop: ${r.stderr}`);
      rmSync(this.dir, { recursive: true, force: true });
    });
  }

  /** `vtpm guest start`; returns the node path it printed (fails the test otherwise). */
  async start(t: Test, name: string, tpm: '1.2' | '2.0', fuse: 'raw' | 'native' = 'raw'): Promise<string> {
    const r = await vtpm(['guest', 'start', name, '--tpm', tpm, '--fuse', fuse, '--dir', this.dir]);
    if (r.code !== 0) throw new Error(`vtpm guest start ${name} failed: ${r.stderr.trim()}`);
    const node = r.stdout.trim();
    t.equal(node, join(this.dir, name, 'dev', 'tpm0'), `guest ${name} node at DIR/${name}/dev/tpm0`);
    return node;
  }

  async stop(t: Test, name: string): Promise<void> {
    const r = await vtpm(['guest', 'stop', name, '--dir', this.dir]);
    t.equal(r.code, 0, `vtpm guest stop ${name}${r.code ? `: ${r.stderr.trim()}` : ''}`);
  }

  async list(): Promise<{ name: string; running: boolean; vtpmd: { pid: number }; front: { pid: number } }[]> {
    const r = await vtpm(['guest', 'list', '--json', '--dir', this.dir]);
    if (r.code !== 0) throw new Error(`vtpm guest list failed: ${r.stderr}`);
    return JSON.parse(r.stdout);
  }
}
