// Where our code runs from: TypeScript sources under tsx (tests, development), the
// JavaScript that `npm run build` (tsc -p tsconfig.build.json) emits into build/, or, for the
// `vtpm` command alone, that command bundled by esbuild into build/cli/ (a few files, not one
// per module and package: it starts sooner). Long-lived per-guest processes (tpmfront, vtpmd,
// the authority) and every worker thread run tsc's JavaScript: without tsx and its esbuild
// transforms a process is ~40 MB smaller, and hosts run hundreds of guests.
// Every helper here follows the form this module runs in, so one code path serves all three;
// a module is named from the checkout's root, never from its caller's own file (inside the
// bundle a module's import.meta.url is the bundle's, in build/cli/).
//   const w = startWorker(codeFile('drivers/tpmfront/fuse-raw-worker'), { workerData })
//   spawn(process.execPath, [...nodeArgs(script), script, ...args])
//   await ensureBuilt(); const script = builtScript('vtpmd/main')  // compiles when stale
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { Worker, type WorkerOptions } from 'node:worker_threads';
import { isAbsolute } from 'node:path';
import { VtpmError } from './errors.ts';

const self = fileURLToPath(import.meta.url);
/** JavaScript (tsc's build/ or the CLI bundle in build/cli/), not TypeScript under tsx. */
const builtSelf = self.endsWith('.js');

/** The checkout: the nearest directory above this module with our package.json. One rule for
 *  drivers/base/ (tsx), build/drivers/base/ (tsc) and build/cli/ (the CLI bundle). */
function findRepoRoot(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    try {
      if ((JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name?: unknown }).name === 'vtpm') return dir;
    } catch {
      // no package.json here, or not ours: look further up
    }
    if (dirname(dir) === dir) throw new VtpmError('ENOENT', `no vtpm checkout above ${from}`);
  }
}

/** The checkout (also when this file runs from build/drivers/base/ or the CLI bundle). */
export const REPO_ROOT = findRepoRoot(dirname(self));
export const BUILD_DIR = join(REPO_ROOT, 'build');
const STAMP = join(BUILD_DIR, '.stamp');
/** What tsconfig.build.json compiles: the daemons' code and the CLI's. */
const SOURCE_DIRS = ['drivers', 'vtpmd', 'manager', 'scripts/cli', 'scripts/support', 'scripts/vtpm.ts'];
/** Besides those sources, what makes build/ stale: the compile's settings, and the lock file
 *  (the CLI bundle holds a copy of its npm dependencies; `npm ci` of a new lock renews them). */
const BUILD_INPUTS = ['tsconfig.build.json', 'package-lock.json'];
/** The bundled `vtpm` command (scripts/vtpm.ts and all it imports): what scripts/vtpm.sh runs. */
const CLI_BUNDLE_DIR = join(BUILD_DIR, 'cli');
const CLI_BUNDLE = join(CLI_BUNDLE_DIR, 'vtpm.js');

/** Our module `rel` (from the checkout's root, no extension: 'vtpmd/engine-worker') in the
 *  form we run in: the TypeScript source under tsx, else tsc's JavaScript in build/ (also
 *  from the CLI bundle, whose modules are not files: its worker threads and the factory
 *  modules they import are build/'s). */
export function codeFile(rel: string): string {
  return builtSelf ? join(BUILD_DIR, `${rel}.js`) : join(REPO_ROOT, `${rel}.ts`);
}

// For the long-lived JavaScript daemons: a 1 MB young generation (they allocate little per
// command; V8's default lets it grow to 16 MB per isolate), GC on the isolate's own thread
// (no helper threads per process), and gc exposed for dropStartupGarbage(). Measured on
// vtpmd: anonymous PSS 40 → 30 MB, same latency; --lite-mode saved 1.5 MB more but cost
// ~15% latency, so it is not used.
const LEAN_FLAGS = ['--max-semi-space-size=1', '--single-threaded-gc', '--expose-gc'];

/** Once start-up is over: a full collection, so the garbage of loading and compiling our
 *  modules is not carried by every idle guest (it is ~20 MB per process until V8 would get
 *  round to it). A no-op unless the process runs with --expose-gc (LEAN_FLAGS). */
export function dropStartupGarbage(): void {
  (globalThis as { gc?: () => void }).gc?.();
}

/** Node flags that must precede `script` on a command line. */
export function nodeArgs(script: string): string[] {
  return script.endsWith('.ts') ? ['--import', 'tsx'] : LEAN_FLAGS;
}

/** Environment for a node child running `script`: the compiled daemons do not take the
 *  caller's NODE_OPTIONS (a test runner's or developer's loader hooks would otherwise be
 *  loaded into every guest's processes; their flags are nodeArgs'). */
export function nodeEnv(script: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra };
  if (!script.endsWith('.ts')) delete env.NODE_OPTIONS;
  return env;
}

/** A worker_thread on `file`: plain for JavaScript; for TypeScript, tsx is registered
 *  inside the worker first (Node 20 does not carry `--import tsx` into workers reliably). */
export function startWorker(file: string | URL, opts: WorkerOptions = {}): Worker {
  const url = typeof file === 'string' ? pathToFileURL(file) : file;
  if (!url.pathname.endsWith('.ts')) return new Worker(url, opts);
  const boot = `import(${JSON.stringify(tsxApi())}).then((m) => { m.register(); return import(${JSON.stringify(url.href)}); })`;
  return new Worker(boot, { ...opts, eval: true });
}

let tsxApiUrl: string | null = null;
function tsxApi(): string {
  return (tsxApiUrl ??= import.meta.resolve('tsx/esm/api'));
}

/** Newest modification time (ms) of the sources the build compiles and of its other inputs. */
function newestSource(): number {
  let newest = 0;
  for (const f of BUILD_INPUTS) newest = Math.max(newest, statSync(join(REPO_ROOT, f), { throwIfNoEntry: false })?.mtimeMs ?? 0);
  const walk = (dir: string): void => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ts')) newest = Math.max(newest, statSync(p).mtimeMs);
    }
  };
  for (const d of SOURCE_DIRS) {
    const p = join(REPO_ROOT, d);
    if (!existsSync(p)) continue;
    if (statSync(p).isDirectory()) walk(p);
    else newest = Math.max(newest, statSync(p).mtimeMs);
  }
  return newest;
}

/** True when build/ holds JavaScript, and the CLI bundle, at least as new as every source
 *  file (scripts/vtpm.sh applies the same rule before it runs the bundle). */
export function buildIsCurrent(): boolean {
  try {
    return existsSync(CLI_BUNDLE) && statSync(STAMP).mtimeMs >= newestSource();
  } catch {
    return false;
  }
}

/** Compile the runtime JavaScript when it is missing or older than the sources. One
 *  compile at a time per checkout (a lock directory); others wait for it, then re-check. */
export async function ensureBuilt(): Promise<void> {
  if (buildIsCurrent()) return;
  mkdirSync(BUILD_DIR, { recursive: true, mode: 0o755 });
  const lock = join(BUILD_DIR, '.lock');
  for (const deadline = Date.now() + 300_000; ; ) {
    try {
      mkdirSync(lock);
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw new VtpmError('EIO', `cannot lock ${lock}`, { cause: e });
      // A lock left by a killed build is stale after the longest build could take.
      const held = statSync(lock, { throwIfNoEntry: false });
      if (!held) continue; // released meanwhile: try again at once
      if (Date.now() - held.mtimeMs > 300_000) rmSync(lock, { recursive: true, force: true });
      else if (Date.now() > deadline) throw new VtpmError('ETIMEDOUT', `another build holds ${lock}`);
      else await new Promise((r) => setTimeout(r, 200));
    }
  }
  try {
    if (buildIsCurrent()) return; // built by whoever held the lock
    process.stderr.write('building runtime JavaScript (tsc -p tsconfig.build.json, then the CLI bundle)...\n');
    // Stamp with the time the compile starts: a source edited during it stays newer.
    const stampTmp = `${STAMP}.${process.pid}`;
    writeFileSync(stampTmp, '');
    try {
      const tsc = join(REPO_ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
      await promisify(execFile)(process.execPath, [tsc, '-p', join(REPO_ROOT, 'tsconfig.build.json')], { cwd: REPO_ROOT });
    } catch (e) {
      rmSync(stampTmp, { force: true });
      const out = (e as { stdout?: string }).stdout?.trim();
      throw new VtpmError('EIO', `building the runtime JavaScript failed${out ? `:\n${out}` : ''}`, { cause: e });
    }
    try {
      await bundleCli();
    } catch (e) {
      rmSync(stampTmp, { force: true });
      throw e;
    }
    renameSync(stampTmp, STAMP);
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

/** Packages the CLI bundle leaves to Node: native addons and what finds files next to
 *  itself (koffi, fuse-native; cbor-extract loads its prebuilt .node through
 *  node-gyp-build from its own __dirname, which a bundle does not have, so cbor-x would
 *  silently lose its native decoder; esbuild runs its own binary, and only ensureBuilt
 *  needs it). Node resolves them from build/cli/, i.e. from the checkout's node_modules. */
const BUNDLE_EXTERNAL = ['koffi', 'fuse-native', 'cbor-extract', 'esbuild'];
/** Our modules that may compute paths from import.meta inside the bundle: this one (it
 *  finds the checkout by walking up, which works from build/cli/ too). */
const BUNDLE_META_OK = new Set(['drivers/base/modules.ts']);

/** Bundle scripts/vtpm.ts and everything it imports into build/cli/ (ESM, split at its lazy
 *  imports so koffi-using code still loads only for the commands that need it). Written to a
 *  fresh directory and swapped in, so build/cli/ never mixes two builds' chunks. */
/** Native addons only the commands that use them may load (lazily): koffi alone costs every
 *  `vtpm` call ~10 ms of its start. */
const LAZY_ONLY = new Set(['koffi', 'fuse-native']);

type BundleInputs = Record<string, { imports: { path: string; kind: string; external?: boolean }[] }>;

/** A chain of static imports from `entry` to one of LAZY_ONLY, if there is one. */
function eagerNative(inputs: BundleInputs, entry: string): string[] | undefined {
  const from = new Map<string, string | null>([[entry, null]]);
  for (const queue = [entry]; queue.length > 0; ) {
    const f = queue.shift()!;
    for (const imp of inputs[f]?.imports ?? []) {
      if (imp.kind !== 'import-statement' || from.has(imp.path)) continue;
      from.set(imp.path, f);
      if (LAZY_ONLY.has(imp.path)) {
        const chain = [imp.path];
        for (let p = from.get(imp.path); p; p = from.get(p)) chain.unshift(p);
        return chain;
      }
      if (!imp.external) queue.push(imp.path);
    }
  }
  return undefined;
}

async function bundleCli(): Promise<void> {
  const esbuild = await import('esbuild');
  const tmp = `${CLI_BUNDLE_DIR}.new.${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  let result: Awaited<ReturnType<typeof esbuild.build>>;
  try {
    result = await esbuild.build({
      absWorkingDir: REPO_ROOT,
      entryPoints: [join(REPO_ROOT, 'scripts', 'vtpm.ts')],
      outdir: tmp,
      bundle: true,
      splitting: true,
      format: 'esm',
      platform: 'node',
      target: 'node20',
      external: BUNDLE_EXTERNAL,
      // Bundled CommonJS packages (commander, @peculiar/*) call require(): give ESM one.
      banner: { js: "import { createRequire as __vtpmCreateRequire } from 'node:module'; const require = __vtpmCreateRequire(import.meta.url);" },
      keepNames: true, // class and function names as in the sources (error names, stacks)
      sourcemap: true,
      metafile: true,
      logLevel: 'silent',
    });
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    const errors = (e as { errors?: { text: string; location?: { file: string; line: number } | null }[] }).errors ?? [];
    const detail = errors.map((m) => `${m.location ? `${m.location.file}:${m.location.line}: ` : ''}${m.text}`).join('\n');
    throw new VtpmError('EIO', `bundling the CLI failed${detail ? `:\n${detail}` : ''}`, { cause: e });
  }
  // A module of ours that finds files relative to itself would find them in build/cli/.
  const selfRelative = Object.keys(result.metafile?.inputs ?? {})
    .filter((f) => !f.startsWith('../') && !f.startsWith('node_modules/') && !BUNDLE_META_OK.has(f))
    .filter((f) => /import\.meta\.(url|dirname|filename)|__dirname|__filename/.test(readFileSync(join(REPO_ROOT, f), 'utf8')));
  if (selfRelative.length > 0) {
    rmSync(tmp, { recursive: true, force: true });
    throw new VtpmError('EINVAL', `the CLI bundle would hold modules that find files relative to themselves (use codeFile() from drivers/base/modules.ts): ${selfRelative.join(', ')}`);
  }
  const eager = eagerNative(result.metafile?.inputs ?? {}, 'scripts/vtpm.ts');
  if (eager) {
    rmSync(tmp, { recursive: true, force: true });
    throw new VtpmError('EINVAL', `every vtpm command would load ${eager[eager.length - 1]} at start-up (import it lazily where it is used): ${eager.join(' → ')}`);
  }
  const old = `${CLI_BUNDLE_DIR}.old.${process.pid}`;
  if (existsSync(CLI_BUNDLE_DIR)) renameSync(CLI_BUNDLE_DIR, old);
  renameSync(tmp, CLI_BUNDLE_DIR);
  rmSync(old, { recursive: true, force: true });
}

/** The compiled script for `rel` (e.g. 'vtpmd/main'): build/rel.js (call ensureBuilt first). */
export function builtScript(rel: string): string {
  return join(BUILD_DIR, `${rel}.js`);
}

/** Something built inside the thread that uses it (a futex-waiting tpmif front, a libtpms
 *  engine: neither can cross threads), named by a structured-cloneable spec: the thread
 *  imports `module` and calls its export `export` with `params`. */
export interface FactorySpec {
  /** Absolute path of a .ts/.js module. */
  module: string;
  /** Name of the factory it exports: (params) => T | Promise<T>. */
  export: string;
  /** Structured-cloneable parameters for the factory. */
  params: unknown;
}

export function checkFactorySpec(spec: unknown): FactorySpec {
  const s = spec as FactorySpec;
  if (!s || typeof s !== 'object' || typeof s.module !== 'string' || typeof s.export !== 'string') {
    throw new VtpmError('EINVAL', 'a factory spec must be { module: string, export: string, params }');
  }
  if (!isAbsolute(s.module) && !s.module.startsWith('file:')) throw new VtpmError('EINVAL', `factory module ${s.module} is neither an absolute path nor a file URL`);
  return s;
}

/** Import the spec's module and call its factory (in the thread that will use the result);
 *  `check` says whether what came back is a T. */
export async function loadFactory<T>(spec: FactorySpec, what: string, check: (v: unknown) => boolean): Promise<T> {
  checkFactorySpec(spec);
  const url = spec.module.startsWith('file:') ? spec.module : pathToFileURL(spec.module).href;
  let mod: Record<string, unknown>;
  try {
    mod = (await import(url)) as Record<string, unknown>;
  } catch (e) {
    throw new VtpmError('EINVAL', `cannot import ${what} module ${spec.module}`, { cause: e });
  }
  const factory = mod[spec.export];
  if (typeof factory !== 'function') throw new VtpmError('EINVAL', `${spec.module} has no function export ${spec.export}`);
  const made = await (factory as (p: unknown) => unknown)(spec.params);
  if (!check(made)) throw new VtpmError('EINVAL', `${spec.module}:${spec.export} did not return a ${what}`);
  return made as T;
}
