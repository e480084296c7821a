// Worker thread for tests and the benchmark: builds one tpmif side from plain parameters.
//   { role: 'back', params, spinUs? }  serveSync with an echo handler (bytes XOR 0x5a); a
//                                        command starting 0xCC sleeps 300 ms first (cancel tests)
//   { role: 'front', params, n, seed, maxSize?, reuse?, spinUs? }  n random commands 10..maxSize, checked
//   { role: 'bench', params, n, size, spinUs? }   n round trips of `size` bytes, timings back
//   { role: 'many', links, rounds }   each round: a TPM2 GetRandom(16) begun on every front, then
//                                      every answer collected and checked (rc 0, 16 bytes)
//   { role: 'wait', evtchn, timeoutMs }   one EvtchnEndpoint.waitSync; posts {code} ('ok' or the error's)
import { parentPort, workerData } from 'node:worker_threads';
import { TpmifBack } from '../../drivers/tpmback/tpmif-back.ts';
import { TpmifFront } from '../../drivers/tpmfront/tpmif-front.ts';
import { EvtchnEndpoint } from '../../drivers/xen/evtchn.ts';
import { getRandom } from '../../drivers/tpm/tpm2.ts';

const wd = workerData as { role: string; params: never; evtchn?: never; timeoutMs?: number; links?: never[]; rounds?: number; n?: number; seed?: number; maxSize?: number; size?: number; spinUs?: number; reuse?: boolean };
const sleeper = new Int32Array(new SharedArrayBuffer(4));

if (wd.role === 'back') {
  const back = TpmifBack.attach(wd.params);
  const out = new Uint8Array(4096);
  const why = back.serveSync((cmd) => {
    if (cmd[0] === 0xcc) Atomics.wait(sleeper, 0, 0, 300);
    const r = out.subarray(0, cmd.length);
    for (let i = 0; i < cmd.length; i++) r[i] = cmd[i]! ^ 0x5a;
    return r;
  }, wd.spinUs ?? 0);
  parentPort!.postMessage({ done: why });
} else if (wd.role === 'front') {
  const front = TpmifFront.attach(wd.params, { timeoutMs: 10_000, spinUs: wd.spinUs ?? 0, reuseResponse: wd.reuse === true });
  let seed = wd.seed ?? 1;
  const rnd = (): number => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const max = wd.maxSize ?? 4096;
  let bad = 0;
  const t0 = performance.now();
  for (let k = 0; k < wd.n!; k++) {
    const len = 10 + Math.floor(rnd() * (max - 9));
    const cmd = new Uint8Array(len);
    for (let i = 0; i < len; i++) cmd[i] = (rnd() * 256) | 0;
    if (cmd[0] === 0xcc) cmd[0] = 0;
    const rsp = front.transmitSync(cmd, k % 5);
    let ok = rsp.length === len;
    for (let i = 0; ok && i < len; i++) if (rsp[i] !== (cmd[i]! ^ 0x5a)) ok = false;
    if (!ok) bad++;
  }
  parentPort!.postMessage({ done: true, bad, ms: performance.now() - t0 });
} else if (wd.role === 'bench') {
  const front = TpmifFront.attach(wd.params, { timeoutMs: 10_000, spinUs: wd.spinUs ?? 0 });
  const cmd = new Uint8Array(wd.size ?? 64).fill(1);
  const lat = new Float64Array(wd.n!);
  const c0 = process.cpuUsage();
  for (let k = 0; k < wd.n!; k++) {
    const t = performance.now();
    front.transmitSync(cmd, 0);
    lat[k] = performance.now() - t;
  }
  const cu = process.cpuUsage(c0);
  parentPort!.postMessage({ done: true, lat: [...lat], cpuUs: cu.user + cu.system });
} else if (wd.role === 'wait') {
  const ep = EvtchnEndpoint.attach(wd.evtchn!);
  let code = 'ok';
  try {
    ep.waitSync(wd.timeoutMs ?? 10_000);
  } catch (e) {
    code = (e as { code?: string }).code ?? 'EIO';
  }
  parentPort!.postMessage({ code });
}
else if (wd.role === 'many') {
  const fronts = wd.links!.map((p) => TpmifFront.attach(p, { timeoutMs: 30_000 }));
  const cmd = getRandom(16);
  let bad = 0;
  const t0 = performance.now();
  for (let r = 0; r < wd.rounds!; r++) {
    for (const f of fronts) f.begin(cmd, 0);
    for (const f of fronts) {
      const rsp = Buffer.from(f.finish());
      // TPM_ST_NO_SESSIONS, size 28, TPM_RC_SUCCESS, TPM2B of 16 bytes
      if (rsp.length !== 28 || rsp.readUInt16BE(0) !== 0x8001 || rsp.readUInt32BE(6) !== 0 || rsp.readUInt16BE(10) !== 16) bad++;
    }
  }
  for (const f of fronts) f.close();
  parentPort!.postMessage({ bad, ms: performance.now() - t0, commands: wd.rounds! * fronts.length });
}
