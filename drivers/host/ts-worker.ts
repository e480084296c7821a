// A worker_thread running a TypeScript module. Loader hooks given with `--import tsx` do
// not reach worker threads on Node 20, so the worker registers tsx itself before it imports
// the module.
import { Worker, type WorkerOptions } from 'node:worker_threads';

const TSX_API = import.meta.resolve('tsx/esm/api');

export function tsWorker(module: URL | string, opts: Omit<WorkerOptions, 'eval'> = {}): Worker {
  const href = typeof module === 'string' ? new URL(module, 'file://').href : module.href;
  const boot = `const { register } = await import(${JSON.stringify(TSX_API)}); register(); await import(${JSON.stringify(href)});`;
  return new Worker(boot, { ...opts, eval: true });
}
