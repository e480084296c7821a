// vtpmd: one process per vTPM instance (Xen's vtpm-stubdom). Joins the host's authority as
// a domain, runs libtpms in its engine thread, and serves the guest's front end through
// a xenbus back end + tpmif shared page.
//
//   tsx vtpmd/main.ts --dir DIR --name NAME --tpm 1.2|2.0 --front DOMID [--uuid UUID]
//
// State: DIR/NAME/state (0700), one file per libtpms blob, written atomically — until the
// manager serves state over its own tpmif, which replaces only the StateStore.
// Readiness (drivers/host/daemon.ts): reports {domid} once the TPM is up and the back end
// waits in InitWait. SIGTERM/SIGINT: close the back end, stop the engine, exit 0.
import { randomUUID } from 'node:crypto';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { reportFailure, reportReady } from '../drivers/host/daemon.ts';
import { dropStartupGarbage, sibling, startWorker } from '../drivers/base/modules.ts';
import { describeError, errorFromWire, VtpmError } from '../drivers/base/errors.ts';
import { Domain } from '../drivers/xen/domain.ts';
import { TpmifBack } from '../drivers/tpmback/tpmif-back.ts';
import { XenbusBack, type BackLink } from '../drivers/tpmback/xenbus-back.ts';
import type { EngineWorkerData, EngineWorkerEvent, EngineWorkerRequest } from './engine-worker.ts';

function log(msg: string): void {
  console.error(`${new Date().toISOString()} vtpmd: ${msg}`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { dir: { type: 'string' }, name: { type: 'string' }, tpm: { type: 'string' }, front: { type: 'string' }, uuid: { type: 'string' } },
  });
  const { dir, name, tpm, front } = values;
  if (!dir || !name || (tpm !== '1.2' && tpm !== '2.0') || !front || !/^\d+$/.test(front)) {
    throw new VtpmError('EINVAL', 'usage: vtpmd --dir DIR --name NAME --tpm 1.2|2.0 --front DOMID [--uuid UUID]');
  }
  const stateDir = join(resolve(dir), name, 'state');

  // The engine thread boots the TPM first: a back end is never offered for a TPM that is not up.
  const worker = startWorker(sibling(import.meta.url, './engine-worker'), {
    workerData: { version: tpm, stateDir } satisfies EngineWorkerData,
  });
  const events: ((e: EngineWorkerEvent) => void)[] = [];
  worker.on('message', (e: EngineWorkerEvent) => {
    const waiter = events.shift();
    if (waiter) waiter(e);
    else log(`unexpected engine event ${e.ev}`);
  });
  const nextEvent = () => new Promise<EngineWorkerEvent>((r) => events.push(r));
  const booted = await Promise.race([
    nextEvent(),
    new Promise<never>((_, rej) => worker.once('error', (e) => rej(new VtpmError('EENGINE', 'engine thread crashed', { cause: e })))),
  ]);
  if (booted.ev === 'error') throw new VtpmError('EENGINE', `TPM ${tpm} failed to start`, { cause: errorFromWire(booted) });
  log(`TPM ${tpm} up (state in ${stateDir})`);

  const domain = await Domain.join(resolve(dir), { name: `vtpmd-${name}` });
  const xb = await XenbusBack.start(domain, { frontId: Number(front), uuid: values.uuid ?? randomUUID() });
  let serving: BackLink | null = null;
  const send = (m: EngineWorkerRequest) => worker.postMessage(m);

  xb.onConnect((link) => {
    serving = link;
    log(`front end ${link.frontId} connected`);
    void nextEvent().then((e) => {
      if (e.ev === 'closed') log(`serving ended (${e.why})`);
      serving = null;
    });
    send({ op: 'serve', tpmif: link.params });
    dropStartupGarbage();
  });
  xb.onDisconnect(() => {
    if (serving) TpmifBack.stopFrom(serving.params);
  });
  reportReady({ ok: true, info: { domid: domain.domid } });
  log(`domain ${domain.domid}, waiting for front end ${front}`);

  let stopping = false;
  const stop = async (why: string) => {
    if (stopping) return;
    stopping = true;
    log(`stopping (${why})`);
    if (serving) TpmifBack.stopFrom(serving.params);
    await xb.close().catch((e) => log(`xenbus close: ${(e as Error).message}`));
    send({ op: 'exit' });
    await new Promise((r) => worker.once('exit', r));
    await domain.leave().catch(() => {});
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
  domain.onLost(() => void stop('authority lost'));
  worker.on('error', (e) => {
    log(`engine thread crashed: ${e.message}`);
    process.exit(1);
  });
}

main().catch((e) => {
  log(describeError(e));
  reportFailure(e);
  process.exit(1);
});
