// `vtpm oci-hook`: containers get their own TPM through the way container engines extend
// themselves, an OCI runtime hook (podman's hooks.d, or the `hooks` of a bundle's
// config.json for runc/crun). The runtime runs it as root with the container's state JSON
// on stdin (OCI runtime spec, "State"):
//   createRuntime  the container's namespaces exist, pivot_root has not happened: the
//                  instance named by the annotation io.vtpm.instance is created (when
//                  io.vtpm.create=true and it is absent) and started by the host's manager,
//                  and its node bound at the container's /dev/tpm0 (and /dev/tpmrm0 when
//                  the node set has one, TPM 2.0) — drivers/host/mount-into.ts.
//   poststop       the instance is stopped (an orderly TPM shutdown); its state stays with
//                  the manager for the next run of a container with that annotation.
// A refusal is one line on stderr and a non-zero exit, which fails the container's start:
// a container that asked for a TPM never runs without one.
//
// The manager is the one of the hook's run dir: --run-dir, else VTPM_RUN_DIR (the hooks.d
// file sets it), else /run/vtpm. The container cannot choose it (no annotation does):
// the hook runs as root, and the run dir decides which manager's instances it hands out.
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import type { Command } from 'commander';
import { describeError, isVtpmError, VtpmError } from '../../drivers/base/errors.ts';
import type { Msg } from '../../drivers/base/frame.ts';
import * as field from '../../drivers/base/validate.ts';
import { REPO_ROOT } from '../../drivers/base/modules.ts';
import { INSTANCE_NAME } from '../../manager/control.ts';
import type { Bind } from '../../drivers/host/mount-into.ts';
import { control, DEFAULTS } from './host.ts';

/** The annotations the hook reads; any other io.vtpm.* key is refused (a typo must not
 *  give a container a TPM other than the one asked for). */
export const ANNOTATION = {
  instance: 'io.vtpm.instance',
  tpm: 'io.vtpm.tpm',
  create: 'io.vtpm.create',
} as const;

const STATE_MAX = 1 << 20;
const VTPM = resolve(REPO_ROOT, 'scripts/vtpm.sh');
const TEMPLATE = resolve(REPO_ROOT, 'scripts/oci/vtpm-hook.json');
/** The PATH the hook runs with: runtimes give hooks only the env they are configured with,
 *  and vtpm.sh needs `node` (this one first). */
const HOOK_PATH = [...new Set([dirname(process.execPath), '/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'])].join(':');

/** The podman hooks.d file (scripts/oci/vtpm-hook.json) for the manager of `runDir`, with
 *  this checkout's vtpm as the hook's path. */
export function hooksJson(runDir: string): string {
  const fill = (s: string) => s.replaceAll('@VTPM@', VTPM).replaceAll('@PATH@', HOOK_PATH).replaceAll('@RUN_DIR@', resolve(runDir));
  const walk = (v: unknown): unknown => (typeof v === 'string' ? fill(v) : Array.isArray(v) ? v.map(walk) : v && typeof v === 'object' ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, walk(x)])) : v);
  return `${JSON.stringify(walk(JSON.parse(readFileSync(TEMPLATE, 'utf8'))), null, 2)}\n`;
}

/** The same hook as a bundle's config.json `hooks` (runc/crun run it with no engine). */
export function bundleHooks(runDir: string): Record<string, { path: string; args: string[]; env: string[]; timeout: number }[]> {
  const h = JSON.parse(hooksJson(runDir)) as { hook: { path: string; args: string[]; env: string[]; timeout: number }; stages: string[] };
  return Object.fromEntries(h.stages.map((s) => [s, [h.hook]]));
}

interface ContainerState {
  id: string;
  status: string;
  pid: number;
  bundle: string;
  annotations: Msg;
}

/** The state JSON a runtime gives a hook, every field we use checked. */
export function parseState(text: string): ContainerState {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new VtpmError('EINVAL', `the container state on stdin is not JSON (${(e as Error).message})`, { cause: e });
  }
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) throw new VtpmError('EINVAL', 'the container state on stdin is not a JSON object');
  const m = raw as Msg;
  const annotations = m.annotations ?? {};
  if (typeof annotations !== 'object' || Array.isArray(annotations) || annotations === null) throw new VtpmError('EINVAL', 'field annotations: expected an object');
  return {
    id: field.str(m, 'id', { max: 1024, what: 'the container id' }),
    status: field.str(m, 'status', { max: 32 }),
    pid: m.pid === undefined ? 0 : field.int(m, 'pid', 0, 0x7fffffff),
    bundle: field.str(m, 'bundle', { max: 4096 }),
    annotations: annotations as Msg,
  };
}

interface Request {
  name: string;
  tpm?: '1.2' | '2.0';
  create: boolean;
}

/** What the container's annotations ask for (null: no io.vtpm.instance, nothing to do). */
export function parseAnnotations(a: Msg): Request | null {
  const known: readonly string[] = Object.values(ANNOTATION);
  for (const k of Object.keys(a)) {
    if (k.startsWith('io.vtpm.') && !known.includes(k)) throw new VtpmError('EINVAL', `unknown annotation ${k} (vtpm reads ${known.join(', ')})`);
  }
  if (a[ANNOTATION.instance] === undefined) return null;
  const rule = { pattern: INSTANCE_NAME, what: 'an instance name (1-32 of a-z 0-9 _ -, starting with a letter or digit)' };
  try {
    return {
      name: field.str(a, ANNOTATION.instance, rule),
      tpm: a[ANNOTATION.tpm] === undefined ? undefined : field.oneOf(a, ANNOTATION.tpm, ['2.0', '1.2'] as const),
      create: field.oneOf(a, ANNOTATION.create, ['true', 'false'] as const, 'false') === 'true',
    };
  } catch (e) {
    // validate.ts names a message's field; here it is an annotation.
    throw new VtpmError('EINVAL', (e as Error).message.replace(/^field /, 'annotation '));
  }
}

interface InstanceRow {
  name: string;
  tpm: string;
  state: string;
  node?: string;
}

/** Which container started each instance: RUN/oci-hook/NAME holds its id, so a poststop
 *  stops only what its own container started (a container refused at createRuntime,
 *  because another one holds the instance, gets a poststop too). */
class Holders {
  private readonly dir: string;
  constructor(runDir: string) {
    this.dir = join(resolve(runDir), 'oci-hook');
  }
  get(name: string): string | undefined {
    try {
      return readFileSync(join(this.dir, name), 'utf8');
    } catch {
      return undefined;
    }
  }
  set(name: string, id: string): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const tmp = join(this.dir, `.${name}.${process.pid}`);
    writeFileSync(tmp, id, { mode: 0o600 });
    renameSync(tmp, join(this.dir, name));
  }
  drop(name: string): void {
    rmSync(join(this.dir, name), { force: true });
  }
}

const short = (id: string) => id.slice(0, 12);

/** createRuntime: the instance created if asked and absent, started, its node bound in. */
async function attach(runDir: string, st: ContainerState, req: Request): Promise<void> {
  if (st.pid <= 0) throw new VtpmError('EINVAL', 'the container state has no pid: run vtpm oci-hook at createRuntime');
  // Loaded here: its binding (koffi) costs every other command ~30 ms.
  const { bindIntoMountNs, mountNsOf } = await import('../../drivers/host/mount-into.ts');
  let theirs: number;
  try {
    theirs = mountNsOf(st.pid);
  } catch (e) {
    throw new VtpmError('ENOENT', `no mount namespace for pid ${st.pid} (${(e as Error).message})`, { cause: e });
  }
  if (theirs === mountNsOf('self')) throw new VtpmError('EINVAL', "the hook runs inside the container's mount namespace (createContainer?): install it for createRuntime, which runtimes run in theirs");
  const config = JSON.parse(readFileSync(join(st.bundle, 'config.json'), 'utf8')) as { root?: { path?: unknown } };
  if (typeof config.root?.path !== 'string') throw new VtpmError('EINVAL', `${join(st.bundle, 'config.json')} has no root.path`);
  const rootfs = isAbsolute(config.root.path) ? config.root.path : resolve(st.bundle, config.root.path);

  const holders = new Holders(runDir);
  const rows = (await control(runDir, 'list')).instances as InstanceRow[];
  const row = rows.find((i) => i.name === req.name);
  if (!row) {
    if (!req.create) throw new VtpmError('ENOENT', `no instance ${req.name} on the host of ${resolve(runDir)} (annotate io.vtpm.create=true, or vtpm create ${req.name})`);
    await control(runDir, 'create', { name: req.name, tpm: req.tpm ?? '2.0' });
  } else {
    if (req.tpm && row.tpm !== req.tpm) throw new VtpmError('EINVAL', `instance ${req.name} is a TPM ${row.tpm}, the container asks for TPM ${req.tpm} (io.vtpm.tpm)`);
    if (row.state === 'running' || row.state === 'restarting') {
      const holder = holders.get(req.name);
      throw new VtpmError('EBUSY', holder && holder !== st.id ? `instance ${req.name} is in use by container ${short(holder)} (vtpm stop ${req.name} if that container is gone)` : `instance ${req.name} is already running outside this container (vtpm stop ${req.name} first)`);
    }
  }
  const node = String((await control(runDir, 'start', { name: req.name, fuse: 'raw' }, 120_000)).node);
  holders.set(req.name, st.id);
  const binds: Bind[] = [{ source: node, target: join(rootfs, 'dev', 'tpm0') }];
  const rm = join(dirname(node), 'tpmrm0');
  if (existsSync(rm)) binds.push({ source: rm, target: join(rootfs, 'dev', 'tpmrm0') });
  try {
    bindIntoMountNs(st.pid, binds);
  } catch (e) {
    // No container runs on without the TPM it asked for; the instance goes back to rest.
    await control(runDir, 'stop', { name: req.name }, 120_000).catch(() => undefined);
    holders.drop(req.name);
    throw e;
  }
}

/** poststop: the instance this container started is stopped; its state stays. */
async function detach(runDir: string, st: ContainerState, req: Request): Promise<void> {
  const holders = new Holders(runDir);
  if (holders.get(req.name) !== st.id) return; // not started for this container (refused, or taken over)
  try {
    await control(runDir, 'stop', { name: req.name }, 120_000);
  } catch (e) {
    if (!isVtpmError(e, 'ENOENT') || !/not running/.test(e.message)) throw e;
  }
  holders.drop(req.name);
}

/** One hook run: the state JSON in, the stage from its status. */
export async function runHook(runDir: string, stateText: string): Promise<void> {
  let st: ContainerState | undefined;
  let req: Request | null = null;
  try {
    st = parseState(stateText);
    req = parseAnnotations(st.annotations);
    if (!req) return; // the container did not ask for a TPM
    if (st.status === 'creating' || st.status === 'created') await attach(runDir, st, req);
    else if (st.status === 'stopped') await detach(runDir, st, req);
    else throw new VtpmError('EINVAL', `container status ${JSON.stringify(st.status)}: vtpm oci-hook runs at createRuntime and poststop`);
  } catch (e) {
    const code = e instanceof VtpmError ? e.code : 'EIO';
    const what = st ? `container ${short(st.id)}${req ? ` (instance ${req.name})` : ''}: ` : '';
    throw new VtpmError(code, `oci-hook: ${what}${describeError(e).replace(/\s*\n\s*/g, ' ')}`, { cause: e });
  }
}

function readStdin(): Promise<string> {
  return new Promise((ok, fail) => {
    const parts: Buffer[] = [];
    let size = 0;
    process.stdin.on('data', (b: Buffer) => {
      size += b.length;
      if (size > STATE_MAX) {
        process.stdin.destroy();
        fail(new VtpmError('EOVERSIZE', `oci-hook: the container state on stdin is larger than ${STATE_MAX} bytes`));
      } else parts.push(b);
    });
    process.stdin.once('end', () => ok(Buffer.concat(parts).toString('utf8')));
    process.stdin.once('error', (e) => fail(new VtpmError('EIO', `oci-hook: reading the container state: ${e.message}`, { cause: e })));
  });
}

export function registerOci(program: Command): void {
  program
    .command('oci-hook')
    .description("OCI runtime hook (createRuntime, poststop): gives a container annotated io.vtpm.instance=NAME that instance's TPM at /dev/tpm0; reads the container's state on stdin")
    .option('--run-dir <dir>', 'runtime dir of the host whose manager serves the containers (VTPM_RUN_DIR)', DEFAULTS.runDir())
    .option('--print-hooks-json', "print podman's hooks.d file for this run dir (for /usr/share/containers/oci/hooks.d/) and exit")
    .action(async (o: { runDir: string; printHooksJson?: boolean }) => {
      if (o.printHooksJson) return void process.stdout.write(hooksJson(o.runDir));
      await runHook(o.runDir, await readStdin());
    });
}
