// Worker side of ChipThread: builds the engine from a factory module, then serves commands
// from the shared buffers. Blocking here is the point: this thread does nothing else, so
// the thread serving the registers never waits on the engine.
import { parentPort, workerData } from 'node:worker_threads';
import { errorResponse } from '../tpm/command.ts';
import type { Engine } from '../tpm/engine.ts';
import { TPM_RC_FAILURE } from '../tpm/rc.ts';
import { TPM_ST_NO_SESSIONS } from '../tpm/tpm2.ts';
import { CTL, CHIP, type ChipThreadData } from './chip-thread.ts';

const data = workerData as ChipThreadData;
const ctl = new Int32Array(data.ctl);
const cmdBuf = new Uint8Array(data.cmd);
const respBuf = new Uint8Array(data.resp);
const failure = errorResponse(TPM_ST_NO_SESSIONS, TPM_RC_FAILURE);

function serve(engine: Engine): void {
  const spinNs = BigInt(Math.max(0, data.spinUs)) * 1000n;
  let idleSince = process.hrtime.bigint();
  let spins = 0;
  for (;;) {
    if (Atomics.load(ctl, CTL.close)) break;
    const s = Atomics.load(ctl, CTL.state);
    if (s !== CHIP.SUBMIT) {
      // Spin a few microseconds after the last command (a driver sends the next one soon),
      // then sleep on the futex (the clock is read every 64 turns: it costs more than a load).
      if ((++spins & 63) === 0 && process.hrtime.bigint() - idleSince > spinNs) {
        // Announce the sleep first: submit() notifies only a sleeping worker, and wait()
        // returns at once if the state moved in between, so no wake-up is lost.
        Atomics.store(ctl, CTL.sleeping, 1);
        Atomics.wait(ctl, CTL.state, s, 1000);
        Atomics.store(ctl, CTL.sleeping, 0);
      }
      continue;
    }
    let resp: Uint8Array;
    try {
      resp = engine.process(cmdBuf.subarray(0, Atomics.load(ctl, CTL.cmdLen)), Atomics.load(ctl, CTL.locality));
      if (resp.length > respBuf.length) resp = failure;
    } catch {
      // The engine turns TPM errors into responses; anything thrown is a broken chip.
      resp = failure;
    }
    respBuf.set(resp);
    Atomics.store(ctl, CTL.respLen, resp.length);
    Atomics.store(ctl, CTL.state, CHIP.DONE);
    Atomics.notify(ctl, CTL.state);
    idleSince = process.hrtime.bigint();
  }
  engine.terminate();
}

try {
  const mod = (await import(data.module)) as Record<string, unknown>;
  const factory = mod[data.exportName] as (args: unknown) => Engine | Promise<Engine>;
  if (typeof factory !== 'function') throw new Error(`${data.module} has no function ${data.exportName}`);
  const engine = await factory(data.args);
  parentPort!.postMessage({ ready: true });
  serve(engine);
  parentPort!.postMessage({ closed: true });
} catch (e) {
  parentPort!.postMessage({ error: (e as Error)?.stack ?? String(e) });
}
