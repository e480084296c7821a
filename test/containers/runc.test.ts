// The hook with no engine: runc runs it from a bundle's config.json made here (hooks at
// createRuntime and poststop, the annotations in the config), against a private manager;
// the same TPM as under podman, kept across runs. And `vtpm oci-hook` itself on states a
// runtime would not send.
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bundleHooks } from '../../scripts/cli/oci.ts';
import { TestHost } from '../guest/host.ts';
import { makeRootfs, mountsUnder, run } from './engine.ts';

const VTPM = join(import.meta.dirname, '../../scripts/vtpm.sh');
const host = new TestHost(t);
const base = mkdtempSync(join(tmpdir(), 'vtpm-runc-'));
const state = join(base, 'runc-state'); // runc --root: nothing under the host's /run/runc
const rootfs = join(base, 'rootfs');
t.teardown(async () => {
  const left = await run('runc', ['--root', state, 'list', '--quiet']);
  for (const id of left.stdout.split('\n').filter(Boolean)) await run('runc', ['--root', state, 'delete', '--force', id]);
  for (const m of mountsUnder(base)) await run('umount', ['-l', m]);
  rmSync(base, { recursive: true, force: true });
});

/** A bundle whose container runs `script` with these annotations and vtpm's hooks. */
function bundle(name: string, annotations: Record<string, string>, script: string): string {
  const dir = join(base, name);
  mkdirSync(dir);
  execFileSync('runc', ['spec', '--bundle', dir]);
  const config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown> & { process: Record<string, unknown> };
  config.root = { path: rootfs, readonly: true };
  config.process.terminal = false;
  config.process.args = ['sh', '-c', script];
  config.process.env = ['PATH=/usr/bin:/bin', 'TPM2TOOLS_TCTI=device:/dev/tpm0'];
  config.hooks = bundleHooks(host.dir);
  config.annotations = annotations;
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  return dir;
}

const runc = (id: string, dir: string) => run('runc', ['--root', state, 'run', '--bundle', dir, id]);

t.before(async () => {
  await host.hostStart();
  makeRootfs(rootfs);
});

t.test('runc runs the hook from config.json: the container has its TPM, kept for its next run', async (t) => {
  const first = bundle('first', { 'io.vtpm.instance': 'bundled', 'io.vtpm.create': 'true' }, [
    'set -e',
    'echo "random $(tpm2_getrandom -T device:/dev/tpm0 --hex 8)"',
    'tpm2_pcrextend 23:sha256=' + 'ab'.repeat(32),
    'tpm2_nvdefine -C o -s 4 -a "ownerread|ownerwrite" 0x1500017',
    'printf runc > /dev/shm/nv',
    'tpm2_nvwrite -C o -i /dev/shm/nv 0x1500017',
    'ls /dev/tpmrm0',
  ].join('\n'));
  const r1 = await runc('vtpm-oci-first', first);
  t.equal(r1.code, 0, `runc run exit 0${r1.code ? `: ${r1.stderr}` : ''}`);
  t.match(r1.stdout, /^random [0-9a-f]{16}$/m, 'tpm2_getrandom on /dev/tpm0');
  t.match(r1.stdout, /^\/dev\/tpmrm0$/m, '/dev/tpmrm0 is there (TPM 2.0)');
  t.equal((await host.row('bundled')).state, 'stopped', 'runc ran poststop: the instance is stopped');

  const again = bundle('again', { 'io.vtpm.instance': 'bundled' }, 'set -e\necho "nv $(tpm2_nvread -C o -s 4 0x1500017)"\ntpm2_pcrread sha256:23');
  const r2 = await runc('vtpm-oci-again', again);
  t.equal(r2.code, 0, `runc run exit 0${r2.code ? `: ${r2.stderr}` : ''}`);
  t.match(r2.stdout, /^nv runc$/m, "the first run's NV index is read back");
  t.match(r2.stdout, /23\s*:\s*0x0{64}/, 'PCR 23 is at zero after the reset');

  const bad = bundle('bad', { 'io.vtpm.instance': 'nobody' }, 'echo container-ran');
  const r3 = await runc('vtpm-oci-bad', bad);
  t.not(r3.code, 0, 'an unknown instance fails runc run');
  t.notMatch(r3.stdout, /container-ran/, 'the container did not run');
  t.match(r3.stderr, /vtpm: oci-hook: container vtpm-oci-bad \(instance nobody\): no instance nobody on the host/, `the hook's reason: ${r3.stderr.trim().split('\n').pop() ?? ''}`);
  t.equal((await run('runc', ['--root', state, 'list', '--quiet'])).stdout.trim(), '', 'no container left');
});

t.test('vtpm oci-hook refuses what a runtime would not send, in one line', async (t) => {
  const hook = (input: string) => run(VTPM, ['oci-hook', '--run-dir', host.dir], 60_000, input);
  const oneLine = (s: string) => s.trim().split('\n').length === 1;
  const garbage = await hook('not json');
  t.ok(garbage.code !== 0 && oneLine(garbage.stderr), `non-JSON state: ${garbage.stderr.trim()}`);
  t.match(garbage.stderr, /^vtpm: oci-hook: the container state on stdin is not JSON/);
  const running = await hook(JSON.stringify({ ociVersion: '1.0.2', id: 'c1', status: 'running', pid: process.pid, bundle: base, annotations: { 'io.vtpm.instance': 'bundled' } }));
  t.ok(running.code !== 0 && oneLine(running.stderr), `a running container: ${running.stderr.trim()}`);
  t.match(running.stderr, /container status "running": vtpm oci-hook runs at createRuntime and poststop/);
  const inside = await hook(JSON.stringify({ ociVersion: '1.0.2', id: 'c2', status: 'creating', pid: process.pid, bundle: base, annotations: { 'io.vtpm.instance': 'bundled' } }));
  t.match(inside.stderr, /the hook runs inside the container's mount namespace/, 'a container pid in our own mount namespace (createContainer) is refused');
  const unasked = await hook(JSON.stringify({ ociVersion: '1.0.2', id: 'c3', status: 'creating', pid: process.pid, bundle: base, annotations: {} }));
  t.equal(unasked.code, 0, 'a container with no io.vtpm.instance is left alone');
  t.equal((await host.row('bundled')).state, 'stopped', 'none of them started the instance');
});
