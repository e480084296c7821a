// Worker side of ChipThread: loads the SyncTransport its spec names, then serves commands
// from the shared buffers. Blocking here is the point: this thread does nothing else, so
// the thread serving the registers never waits on the TPM.
import { parentPort, workerData } from 'node:worker_threads';
import { errorToWire } from '../base/errors.ts';
import { failureResponse } from '../tpm/command.ts';
import { loadTransport, type SyncTransport } from '../tpm/transport.ts';
import { CTL, CHIP, type ChipThreadData, type ChipThreadEvent } from './chip-thread.ts';

const data = workerData as ChipThreadData;
const ctl = new Int32Array(data.ctl);
const cmdBuf = new Uint8Array(data.cmd);
const respBuf = new Uint8Array(data.resp);
const failure = failureResponse('2.0'); // a TIS chip is a TPM 2.0 (STS family)
const post = (m: ChipThreadEvent) => parentPort!.postMessage(m);

function serve(tpm: SyncTransport): void {
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
        // Announce the sleep, then look again: a submit() or close() after the look sees
        // sleeping = 1, clears it and wakes us (the wait returns at once if it was cleared
        // first), so no wake-up is lost and the sleep needs no timeout.
        Atomics.store(ctl, CTL.sleeping, 1);
        if (Atomics.load(ctl, CTL.state) === s && !Atomics.load(ctl, CTL.close)) Atomics.wait(ctl, CTL.sleeping, 1);
        Atomics.store(ctl, CTL.sleeping, 0);
      }
      continue;
    }
    let resp: Uint8Array;
    try {
      resp = tpm.transmitSync(cmdBuf.subarray(0, Atomics.load(ctl, CTL.cmdLen)), Atomics.load(ctl, CTL.locality));
      if (resp.length > respBuf.length) resp = failure;
    } catch {
      // TPM errors are responses; anything thrown is a broken chip, and answers as one.
      resp = failure;
    }
    respBuf.set(resp);
    Atomics.store(ctl, CTL.respLen, resp.length);
    Atomics.store(ctl, CTL.state, CHIP.DONE);
    Atomics.notify(ctl, CTL.state);
    idleSince = process.hrtime.bigint();
  }
  tpm.close();
}

try {
  const tpm = await loadTransport(data.transport);
  post({ ready: true });
  serve(tpm);
  post({ closed: true });
} catch (e) {
  post({ error: errorToWire(e) });
}
