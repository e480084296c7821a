// Start a worker_thread running a TypeScript file under tsx, whatever loader flags the
// parent was started with (Node 20 does not carry `--import tsx` into workers reliably).
//   const w = startTsWorker(new URL('./my-worker.ts', import.meta.url), { workerData })
import { Worker, type WorkerOptions } from 'node:worker_threads';
import { pathToFileURL } from 'node:url';

const tsxApi = import.meta.resolve('tsx/esm/api');

export function startTsWorker(file: string | URL, opts: WorkerOptions = {}): Worker {
  const url = typeof file === 'string' ? pathToFileURL(file).href : file.href;
  const boot = `import(${JSON.stringify(tsxApi)}).then((m) => { m.register(); return import(${JSON.stringify(url)}); })`;
  return new Worker(boot, { ...opts, eval: true });
}
