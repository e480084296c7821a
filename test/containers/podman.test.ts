// Acceptance: `podman run --annotation io.vtpm.instance=NAME` gives the container its own
// persistent TPM at /dev/tpm0, through vtpm's hooks.d file (scripts/oci/vtpm-hook.json) in
// a private hooks dir, against a private manager (TestHost); and a container whose TPM
// cannot be given is not started, with the hook's one-line reason in podman's error.
import t, { type Test } from 'tap';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TestHost, vtpm } from '../guest/host.ts';
import { mountsUnder, Podman } from './engine.ts';

const host = new TestHost(t);
const podman = new Podman(t);
const digest = createHash('sha256').update('container web').digest();
const pcr16 = createHash('sha256').update(Buffer.alloc(32)).update(digest).digest('hex');
const ZERO = '0'.repeat(64);
const NV = '0x1500016';

/** The sha256 PCR 16 value `tpm2_pcrread sha256:16` printed. */
const pcrOf = (out: string) => /16\s*:\s*0x([0-9A-Fa-f]{64})/.exec(out)?.[1]?.toLowerCase();

t.before(async () => {
  await host.hostStart();
  await podman.build();
});

t.test('a container gets its own TPM 2.0 at /dev/tpm0 (and /dev/tpmrm0), created on first use', async (t) => {
  const r = await podman.runScript(host.dir, { 'io.vtpm.instance': 'web', 'io.vtpm.create': 'true' }, [
    'set -e',
    'ls /dev/tpm0 /dev/tpmrm0',
    'echo "random $(tpm2_getrandom -T device:/dev/tpm0 --hex 8)"',
    `tpm2_pcrextend 16:sha256=${digest.toString('hex')}`,
    'tpm2_pcrread sha256:16',
    `tpm2_nvdefine -C o -s 8 -a "ownerread|ownerwrite" ${NV}`,
    'printf vtpm-web > /dev/shm/nv',
    `tpm2_nvwrite -C o -i /dev/shm/nv ${NV}`,
    `echo "nv $(tpm2_nvread -C o -s 8 ${NV})"`,
    'echo "rm $(tpm2_getrandom -T device:/dev/tpmrm0 --hex 4)"',
  ].join('\n'));
  t.equal(r.code, 0, `podman run exit 0${r.code ? `: ${r.stderr}` : ''}`);
  t.match(r.stdout, /^random [0-9a-f]{16}$/m, 'tpm2_getrandom -T device:/dev/tpm0 8 inside the container');
  t.equal(pcrOf(r.stdout), pcr16, 'tpm2_pcrextend on /dev/tpm0: PCR 16 = SHA-256(0^32 || digest)');
  t.match(r.stdout, /^nv vtpm-web$/m, 'an NV index defined, written and read back');
  t.match(r.stdout, /^rm [0-9a-f]{8}$/m, '/dev/tpmrm0 answers too');
  const row = await host.row('web');
  t.equal(row.state, 'stopped', 'poststop stopped the instance (podman run --rm returned)');
  t.equal(row.tpm, '2.0', 'a TPM 2.0 by default');
});

t.test('another container with another instance name sees a TPM of its own: PCRs at zero, no NV index', async (t) => {
  const r = await podman.runScript(host.dir, { 'io.vtpm.instance': 'db', 'io.vtpm.create': 'true', 'io.vtpm.tpm': '2.0' }, 'set -e\ntpm2_pcrread sha256:16\necho "public: $(tpm2_nvreadpublic)"');
  t.equal(r.code, 0, `podman run exit 0${r.code ? `: ${r.stderr}` : ''}`);
  t.equal(pcrOf(r.stdout), ZERO, 'PCR 16 is zero in the second container');
  t.notMatch(r.stdout, /0x1500016/i, "the first container's NV index is not there");
  t.equal((await host.row('db')).state, 'stopped', 'its instance stopped at poststop');
});

t.test("rerunning the first container's name: its NV index is still there, a fresh boot's PCRs", async (t) => {
  const before = await host.row('web');
  const r = await podman.runScript(host.dir, { 'io.vtpm.instance': 'web' }, `set -e\necho "nv $(tpm2_nvread -C o -s 8 ${NV})"\ntpm2_pcrread sha256:16`);
  t.equal(r.code, 0, `podman run exit 0${r.code ? `: ${r.stderr}` : ''}`);
  t.match(r.stdout, /^nv vtpm-web$/m, 'the NV index written in the first run is read back');
  t.equal(pcrOf(r.stdout), ZERO, 'PCR 16 starts at zero again (a TPM reset, like a reboot)');
  t.equal((await host.row('web')).uuid, before.uuid, 'the same instance (uuid) as the first run');
});

t.test('io.vtpm.tpm=1.2: a TPM 1.2 at /dev/tpm0, no tpmrm0', async (t) => {
  // TPM_GetRandom(8) written raw; the response's tag (00 c4) and return code (0) read back.
  const script = [
    'set -e',
    'test -e /dev/tpm0',
    'test ! -e /dev/tpmrm0 && echo "no tpmrm0"',
    'exec 3<>/dev/tpm0',
    "printf '\\000\\301\\000\\000\\000\\016\\000\\000\\000\\106\\000\\000\\000\\010' >&3",
    'echo "resp $(od -An -tx1 -N 22 <&3 | tr -s " \\n" " ")"',
  ].join('\n');
  const r = await podman.runScript(host.dir, { 'io.vtpm.instance': 'old', 'io.vtpm.create': 'true', 'io.vtpm.tpm': '1.2' }, script);
  t.equal(r.code, 0, `podman run exit 0${r.code ? `: ${r.stderr}` : ''}`);
  t.match(r.stdout, /^no tpmrm0$/m, 'a TPM 1.2 has no tpmrm0');
  t.match(r.stdout, /^resp\s*00 c4 00 00 00 16 00 00 00 00 00 00 00 08( [0-9a-f]{2}){8}\s*$/m, 'TPM_GetRandom answered by a TPM 1.2');
  t.equal((await host.row('old')).tpm, '1.2', 'the instance was created as a TPM 1.2');
});

/** A container the hook must refuse: podman fails, the command never ran, the reason is
 *  the hook's one line. */
async function refused(t: Test, runDir: string, annotations: Record<string, string>, reason: RegExp, what: string): Promise<void> {
  const r = await podman.runScript(runDir, annotations, 'echo container-ran');
  t.not(r.code, 0, `${what}: podman run fails`);
  t.notMatch(r.stdout, /container-ran/, `${what}: the container's command did not run`);
  const line = r.stderr.split('\n').find((l) => l.includes('vtpm: oci-hook:'));
  t.ok(line, `${what}: podman shows the hook's message`);
  t.match(line ?? '', reason, `${what}: ${line?.replace(/.*vtpm: oci-hook: /, '') ?? r.stderr}`);
}

t.test('a container whose TPM cannot be given does not start', async (t) => {
  await refused(t, host.dir, { 'io.vtpm.instance': 'Bad Name' }, /annotation io\.vtpm\.instance: expected an instance name/, 'a bad instance name');
  await refused(t, host.dir, { 'io.vtpm.instance': 'web', 'io.vtpm.tpm': '3.0' }, /annotation io\.vtpm\.tpm: expected one of 2\.0, 1\.2, got "3\.0"/, 'a bad TPM version');
  await refused(t, host.dir, { 'io.vtpm.instance': 'web', 'io.vtpm.create': 'yes' }, /annotation io\.vtpm\.create: expected one of true, false/, 'a bad io.vtpm.create');
  await refused(t, host.dir, { 'io.vtpm.instance': 'web', 'io.vtpm.creat': 'true' }, /unknown annotation io\.vtpm\.creat/, 'a misspelt annotation');
  await refused(t, host.dir, { 'io.vtpm.instance': 'web', 'io.vtpm.tpm': '1.2' }, /instance web is a TPM 2\.0, the container asks for TPM 1\.2/, 'a TPM version other than the instance has');
  await refused(t, host.dir, { 'io.vtpm.instance': 'ghost' }, /\(instance ghost\): no instance ghost on the host .*io\.vtpm\.create=true/, 'an unknown instance without io.vtpm.create');
  t.notOk((await host.list()).some((i) => i.name === 'ghost'), 'no instance was created for it');

  // An instance in use elsewhere is not shared, and the refused container's poststop
  // leaves it running.
  const s = await vtpm(['start', 'web', ...host.args], 120_000);
  t.equal(s.code, 0, `vtpm start web by hand${s.code ? `: ${s.stderr}` : ''}`);
  await refused(t, host.dir, { 'io.vtpm.instance': 'web' }, /instance web is already running outside this container/, 'an instance already running');
  t.equal((await host.row('web')).state, 'running', "the refused container's poststop did not stop it");
  await host.stop(t, 'web');

  const none = mkdtempSync(join(tmpdir(), 'vtpm-nomgr-'));
  t.teardown(() => rmSync(none, { recursive: true, force: true }));
  await refused(t, join(none, 'run'), { 'io.vtpm.instance': 'web' }, /no manager runs for .*vtpm-nomgr-.*\/run \(start one with: vtpm host start\)/, 'a manager that is not running');
});

t.test('nothing left behind: no containers, the instances stopped, no mounts', async (t) => {
  const ps = await podman.podman(['ps', '--all', '--quiet']);
  t.equal(ps.stdout.trim(), '', 'no containers left (--rm)');
  t.same((await host.list()).map((i) => [i.name, i.state]).sort(), [['db', 'stopped'], ['old', 'stopped'], ['web', 'stopped']], 'every instance stopped');
  t.same(mountsUnder(join(host.dir)).filter((m) => m.endsWith('/dev')), [], 'no node mounted on the host');
  t.notOk(existsSync(join(host.dir, 'oci-hook', 'web')), "no container holds web's instance");
});
