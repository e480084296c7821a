// Containers for the OCI hook's tests, with no registry: a root file system made here
// (busybox-static and tpm2-tools' binary with every library it and its device TCTI load),
// imported as a local image into a private podman store (its own root, run root, tmp dir
// and hooks dir: nothing of the host's podman is read or changed), and removed at the end.
// The runtime is runc: crun 1.8 (Debian 12) refuses a host whose cgroup v2 hierarchy
// holds controllers beside v1 ("hybrid mode"), as these machines do.
import { execFile, execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import type { Test } from 'tap';
import { hooksJson } from '../../scripts/cli/oci.ts';
import type { CliResult } from '../guest/host.ts';

/** The tpm2-tools the tests run inside, as links to the multi-call binary. */
const TOOLS = ['tpm2_getrandom', 'tpm2_pcrextend', 'tpm2_pcrread', 'tpm2_nvdefine', 'tpm2_nvwrite', 'tpm2_nvread', 'tpm2_nvreadpublic'];
const TCTI = 'libtss2-tcti-device.so.0';

/** Run a program without the test runner's NODE_OPTIONS (tap puts it in every spawn). */
export function run(file: string, args: string[], timeoutMs = 120_000, input?: string): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = execFile('/usr/bin/env', ['-u', 'NODE_OPTIONS', file, ...args], { timeout: timeoutMs, encoding: 'utf8', maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
    child.stdin?.end(input ?? '');
  });
}

/** Every absolute path `ldd` names for `file` (its libraries and the loader). */
function libraries(file: string): string[] {
  return [...execFileSync('ldd', [file], { encoding: 'utf8' }).matchAll(/(\/\S+)/g)].map((m) => m[1]!);
}

/** A root file system holding /bin/sh (busybox) and the tpm2-tools above. */
export function makeRootfs(dir: string): void {
  for (const d of ['bin', 'usr/bin', 'dev', 'proc', 'sys', 'tmp', 'etc']) mkdirSync(join(dir, d), { recursive: true });
  copyFileSync('/bin/busybox', join(dir, 'bin/busybox'));
  for (const a of ['sh', 'ls', 'cat', 'echo', 'test', '[', 'printf', 'grep', 'od', 'head', 'tr']) symlinkSync('busybox', join(dir, 'bin', a));
  const tpm2 = realpathSync('/usr/bin/tpm2_getrandom');
  const tcti = execFileSync('/sbin/ldconfig', ['-p'], { encoding: 'utf8' }).match(new RegExp(`${TCTI.replaceAll('.', '\\.')} \\(libc6,x86-64\\) => (\\S+)`))?.[1] ?? `/lib/x86_64-linux-gnu/${TCTI}`;
  const copy = (f: string, to = f) => {
    mkdirSync(dirname(join(dir, to)), { recursive: true });
    copyFileSync(f, join(dir, to)); // following links: the file itself
  };
  copy(tpm2, '/usr/bin/tpm2');
  for (const t of TOOLS) symlinkSync('tpm2', join(dir, 'usr/bin', t));
  // dlopen'ed by name at run time: under the loader's default directory.
  copy(tcti, `/lib/x86_64-linux-gnu/${TCTI}`);
  for (const lib of new Set([...libraries(tpm2), ...libraries(tcti)])) copy(lib);
  writeFileSync(join(dir, 'etc/passwd'), 'root:x:0:0:root:/:/bin/sh\n');
}

/** Mount points at or under `dir` (longest first, for unmounting). */
export function mountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m === dir || m.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length);
}

/** A private podman with one local image (`image`) and a hooks dir holding the vtpm hook
 *  for the manager of `runDir` (hooksDir(other) for another run dir). */
export class Podman {
  readonly base: string;
  readonly image: string;
  private readonly hooks = new Map<string, string>();

  constructor(t: Test) {
    this.base = mkdtempSync(join(tmpdir(), 'vtpm-podman-'));
    this.image = `localhost/vtpm-oci-test:${process.pid}`;
    t.teardown(async () => {
      await this.podman(['rm', '--all', '--force', '--time', '0']);
      await this.podman(['rmi', '--all', '--force']);
      for (const m of mountsUnder(this.base)) await run('umount', ['-l', m]);
      rmSync(this.base, { recursive: true, force: true });
    });
  }

  /** The store's options: vfs (no overlay mounts to leave behind), no systemd, no events. */
  private get global(): string[] {
    const b = this.base;
    return ['--root', join(b, 'root'), '--runroot', join(b, 'runroot'), '--tmpdir', join(b, 'tmp'), '--storage-driver', 'vfs', '--cgroup-manager', 'cgroupfs', '--events-backend', 'none', '--runtime', 'runc'];
  }

  podman(args: string[], timeoutMs = 120_000): Promise<CliResult> {
    return run('podman', [...this.global, ...args], timeoutMs);
  }

  /** Build the image from a root file system made here (`podman import` of its tarball). */
  async build(): Promise<void> {
    const rootfs = join(this.base, 'rootfs');
    makeRootfs(rootfs);
    const tar = join(this.base, 'rootfs.tar');
    execFileSync('tar', ['-C', rootfs, '-cf', tar, '.']);
    const r = await this.podman(['import', '--quiet', tar, this.image]);
    if (r.code !== 0) throw new Error(`podman import: ${r.stderr}`);
  }

  /** A hooks dir with vtpm's hooks.d file (scripts/oci/vtpm-hook.json) for `runDir`. */
  hooksDir(runDir: string): string {
    let d = this.hooks.get(runDir);
    if (!d) {
      d = join(this.base, `hooks-${this.hooks.size}`);
      mkdirSync(d);
      writeFileSync(join(d, 'vtpm.json'), hooksJson(runDir));
      this.hooks.set(runDir, d);
    }
    return d;
  }

  /** `podman run --rm` of `script` (busybox sh) with these annotations, the hook of `runDir`. */
  runScript(runDir: string, annotations: Record<string, string>, script: string): Promise<CliResult> {
    const ann = Object.entries(annotations).flatMap(([k, v]) => ['--annotation', `${k}=${v}`]);
    // These machines' root lacks CAP_SYS_RESOURCE: limits at or below the hard ones.
    const limits = ['--ulimit', 'nofile=1024:1024', '--ulimit', 'nproc=1024:1024'];
    return this.podman(['--hooks-dir', this.hooksDir(runDir), 'run', '--rm', '--network', 'none', ...limits, ...ann, '--env', 'TPM2TOOLS_TCTI=device:/dev/tpm0', this.image, 'sh', '-c', script]);
  }
}
