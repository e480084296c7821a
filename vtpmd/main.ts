// vtpmd: one process per vTPM instance (Xen's vtpm-stubdom). Joins the host's authority as
// a domain, runs libtpms and serves the guest's front end through a xenbus back end +
// tpmif shared page, all on one thread (one V8 isolate per guest: a second, an engine
// worker thread, cost 8 MB PSS per guest; the grouped and QEMU forms keep their threads).
//
//   vtpmd --dir DIR --name NAME --tpm 1.2|2.0 --front DOMID [--uuid UUID] [--state-link]
//   vtpmd --dir DIR --name NAME --tpm 1.2|2.0 --uuid UUID --state-link   (stdin: "MANAGER FRONT")
//   vtpmd --dir DIR --name NAME --tpm 1.2|2.0 --qemu CTRL --uuid UUID --state-link   (vtpmd/qemu.ts)
//   vtpmd --dir DIR --warm   (stdin: "MANAGER", then "NAME TPM UUID FRONT": the manager's warm pool)
//   vtpmd --dir DIR --group G [--threads N]   (many vTPMs in one process: vtpmd/group.ts)
//
// State: with --state-link (how the manager starts it), every blob goes to the manager
// through a second front/back pair, as vtpm-stubdom's go to vtpmmgr: vtpmd reports
// {domid} as soon as it has joined, reads the manager's domid on stdin, connects its state
// front end to the manager's back end, and only then boots the TPM; it never touches a
// state dir. Without it (vtpmd run by hand, tests), DIR/NAME/state holds plain blob files.
// Readiness (drivers/host/daemon.ts): without --state-link, {domid} once the TPM is up and
// the guest's back end waits in InitWait. SIGTERM/SIGINT: close the back end, stop the
// engine (an orderly TPM shutdown), close the state link, exit 0. SIGUSR1: suspend (below).
import { randomUUID } from 'node:crypto';
import { closeSync, openSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { parseDomid, readLineFromStdin, reportFailure, reportReady } from '../drivers/host/daemon.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import { serveQemuGuest } from './qemu.ts';
import { XenbusFront } from '../drivers/tpmfront/xenbus-front.ts';
import { dropStartupGarbage } from '../drivers/base/modules.ts';
import { describeError, VtpmError } from '../drivers/base/errors.ts';
import { Domain } from '../drivers/xen/domain.ts';
import { TpmifBack } from '../drivers/tpmback/tpmif-back.ts';
import { XenbusBack, type BackLink } from '../drivers/tpmback/xenbus-back.ts';
import { SUSPEND_FAILED } from './exit-codes.ts';
import { HostedTpm, type EngineState } from './engine-core.ts';
import type { TpmifParams } from '../drivers/xen/tpmif-page.ts';
import { sysDup2 } from '../drivers/base/libc.ts';
import { groupMain } from './group.ts';

/** How long a state request may wait for the manager before the TPM command fails (a
 *  manager restarting comes back well within it; a command is never acknowledged unsaved). */
const STATE_TIMEOUT_MS = 10_000;

function log(msg: string): void {
  console.error(`${new Date().toISOString()} vtpmd: ${msg}`);
}

/** An instance name as the manager gives it (what a warm vtpmd accepts on stdin). */
const INSTANCE = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Which vTPM a tpm0 vtpmd serves, and where its state lives. */
interface Tpm0Job {
  dir: string;
  name: string;
  tpm: TpmVersion;
  uuid: string;
  /** The guest's front-end domain (known up front, or sent by the manager). */
  frontId?: number;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      dir: { type: 'string' },
      name: { type: 'string' },
      tpm: { type: 'string' },
      front: { type: 'string' },
      uuid: { type: 'string' },
      'state-link': { type: 'boolean', default: false },
      qemu: { type: 'string' },
      warm: { type: 'boolean', default: false },
      group: { type: 'string' },
      threads: { type: 'string' },
    },
  });
  const { dir, name, tpm, front, qemu } = values;
  const linked = values['state-link'] === true;
  if (values.group !== undefined || values.threads !== undefined) {
    if (!dir || values.group === undefined || name || tpm || front || qemu || values.uuid || linked || values.warm || (values.threads !== undefined && !/^\d+$/.test(values.threads))) {
      throw new VtpmError('EINVAL', 'usage: vtpmd --dir DIR --group G [--threads N] (members arrive over DIR/groups/G.sock)');
    }
    return groupMain(resolve(dir), values.group, Number(values.threads ?? 2));
  }
  if (values.warm) {
    if (!dir || name || tpm || front || qemu || values.uuid || linked) throw new VtpmError('EINVAL', 'usage: vtpmd --dir DIR --warm (the instance arrives on stdin)');
    return warmMain(resolve(dir));
  }
  // --front may be left out with --state-link: the manager then sends the front's domid on
  // stdin beside its own, so it can start the front end and vtpmd at the same time.
  const guestOk = qemu ? linked && !front : front ? /^\d+$/.test(front) : linked;
  if (!dir || !name || (tpm !== '1.2' && tpm !== '2.0') || !guestOk || (linked && !values.uuid)) {
    throw new VtpmError('EINVAL', 'usage: vtpmd --dir DIR --name NAME --tpm 1.2|2.0 (--front DOMID | --qemu CTRL) [--uuid UUID] [--state-link (needs --uuid; --qemu needs it)] | vtpmd --dir DIR --warm');
  }
  const uuid = values.uuid ?? randomUUID();
  const domain = await Domain.join(resolve(dir), { name: `vtpmd-${name}` });
  if (qemu) return qemuMain(domain, { tpm, uuid, ctrlPath: resolve(qemu) });
  const job: Tpm0Job = { dir: resolve(dir), name, tpm, uuid, ...(front === undefined ? {} : { frontId: Number(front) }) };
  if (!linked) return serveTpm0(domain, job);
  reportReady({ ok: true, info: { domid: domain.domid } });
  const [managerText, frontText] = (await readLineFromStdin('manager domid', 30_000)).split(' ');
  const manager = parseDomid(managerText ?? '', 'manager');
  if (job.frontId === undefined) job.frontId = parseDomid(frontText ?? '', 'front end');
  const link = await connectToManager(domain, manager);
  log(`state link to the manager (domain ${manager}) connected`);
  return serveTpm0(domain, job, link);
}

/** The state link to the manager: its xenbus front end, connected (what the engine's
 *  LinkStateStore attaches to). */
interface ManagerLink {
  front: XenbusFront;
  params: TpmifParams;
}

async function connectToManager(domain: Domain, manager: number): Promise<ManagerLink> {
  const front = await XenbusFront.start(domain, { backendId: manager, reconnect: false });
  return { front, params: (await front.connected(30_000)).params };
}

/** --warm: a vtpmd the manager starts before any instance needs it (its warm pool): Node,
 *  the modules (libtpms' binding, koffi), the domain and the state link to the manager (its
 *  domid comes first on stdin) are up; `vtpm start` then only hands it an instance on stdin
 *  — "NAME TPM UUID FRONT" — and it goes on as a --state-link vtpmd would, logging to
 *  DIR/NAME/vtpmd.log from then on. It waits with no timer (stdin closing, as when its
 *  manager dies, ends it). */
async function warmMain(dir: string): Promise<void> {
  const domain = await Domain.join(dir, { name: 'vtpmd-warm' });
  // Until it serves an instance, a lost authority ends it (its manager joins a new one).
  let waiting = true;
  domain.onLost(() => {
    if (!waiting) return;
    log('the authority went away while this vtpmd waited: exiting');
    process.exit(1);
  });
  reportReady({ ok: true, info: { domid: domain.domid } });
  // The manager's domid once its back end of our state link waits: the link connects now,
  // before any instance (the manager serves it nothing until it hands one over).
  const manager = parseDomid(await readLineFromStdin('manager domid', Infinity), 'manager');
  const link = await connectToManager(domain, manager);
  const line = await readLineFromStdin('instance', Infinity);
  const [name, tpm, uuid, front, ...more] = line.split(' ');
  if (!name || !INSTANCE.test(name) || (tpm !== '1.2' && tpm !== '2.0') || !uuid || !UUID.test(uuid) || more.length > 0) {
    throw new VtpmError('EINVAL', `a warm vtpmd got no valid instance ("NAME TPM UUID FRONT"): ${JSON.stringify(line.slice(0, 120))}`);
  }
  const frontId = parseDomid(front ?? '', 'front end');
  waiting = false;
  const logFd = openSync(join(dir, name, 'vtpmd.log'), 'a', 0o600);
  sysDup2(logFd, 1);
  sysDup2(logFd, 2);
  closeSync(logFd);
  log(`warm vtpmd (domain ${domain.domid}) now serves instance ${name}`);
  log(`state link to the manager (domain ${manager}) connected while warm`);
  return serveTpm0(domain, { dir, name, tpm, uuid, frontId }, link);
}

/** Boot the TPM (state from the manager over `link`, connected by the caller — a warm
 *  vtpmd's before it knew its instance — or, without one, plain files) and serve the
 *  guest's tpm0 back end, all on this one thread: a command runs synchronously in its
 *  event-loop turn (its state stores wait for the manager in a blocking futex wait), so
 *  signals and xenbus events are handled between commands, never during one. */
async function serveTpm0(domain: Domain, job: Tpm0Job, link?: ManagerLink): Promise<void> {
  const { dir, name, tpm, uuid, frontId } = job;
  const stateLink = link?.front;
  const state: EngineState = link ? { link: link.params, uuid, timeoutMs: STATE_TIMEOUT_MS } : { dir: join(dir, name, 'state') };

  // The TPM is booted first: a back end is never offered for a TPM that is not up.
  let engine: HostedTpm;
  try {
    engine = HostedTpm.boot({ version: tpm, state }, { log });
  } catch (e) {
    throw new VtpmError('EENGINE', `TPM ${tpm} failed to start`, { cause: e });
  }
  log(`TPM ${tpm} up (state ${'dir' in state ? `in ${state.dir}` : 'served by the manager'})`);

  const xb = await XenbusBack.start(domain, { frontId: frontId!, uuid });
  /** The connection being served, and its serve loop's end. */
  let serving: { link: BackLink; done: Promise<void> } | null = null;
  xb.onConnect((link) => {
    log(`front end ${link.frontId} connected`);
    const back = TpmifBack.attach(link.params);
    // Between commands the wait for the next one sits on a libuv pool thread, which
    // process.exit joins: whatever the exit, that wait is interrupted first.
    const interrupt = () => TpmifBack.stopFrom(link.params);
    process.on('exit', interrupt);
    const done = back.serveAsync(engine.handle).then((why) => {
      process.off('exit', interrupt);
      back.detach();
      log(`serving ended (${why})`);
      if (serving?.link === link) serving = null;
    });
    serving = { link, done };
    dropStartupGarbage();
  });
  xb.onDisconnect(() => {
    if (serving) TpmifBack.stopFrom(serving.link.params);
  });
  if (!link) reportReady({ ok: true, info: { domid: domain.domid } });
  log(`domain ${domain.domid}, waiting for front end ${frontId}`);

  let stopping = false;
  /** The guest's back end closed and its serve loop left (it ends between commands). */
  const closeGuest = async () => {
    const s = serving;
    if (s) TpmifBack.stopFrom(s.link.params);
    await xb.close().catch((e) => log(`xenbus close: ${(e as Error).message}`));
    await s?.done;
  };
  const leave = async (code: number) => {
    await stateLink?.close().catch((e) => log(`state link close: ${(e as Error).message}`));
    await domain.leave().catch(() => {});
    process.exit(code);
  };
  const stop = async (why: string) => {
    if (stopping) return;
    stopping = true;
    log(`stopping (${why})`);
    await closeGuest();
    engine.stop();
    await leave(0);
  };
  // SIGUSR1: suspend (the manager's `vtpm suspend`): the guest's back end closes, the
  // running TPM's volatile state goes to the manager, and vtpmd exits 0 with no TPM
  // shutdown. If the state cannot be stored, an orderly stop instead, exit SUSPEND_FAILED.
  const suspend = async () => {
    if (stopping) return;
    stopping = true;
    log('suspending');
    await closeGuest();
    let code = 0;
    try {
      log(`suspended: ${engine.suspend()} bytes of volatile state stored with the manager`);
    } catch (e) {
      code = SUSPEND_FAILED;
      log(describeError(e));
      engine.stop();
    }
    await leave(code);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
  process.on('SIGUSR1', () => void suspend());
  domain.onLost(() => void stop('authority lost'));
}

/** --qemu: the manager's line on stdin is "<its domid> <export key, hex>" (stdin: the key
 *  is never on a command line or in a file). */
async function qemuMain(domain: Domain, o: { tpm: TpmVersion; uuid: string; ctrlPath: string }): Promise<void> {
  reportReady({ ok: true, info: { domid: domain.domid } });
  const [domidText, keyHex] = (await readLineFromStdin('manager domid and export key', 30_000)).split(' ');
  const manager = parseDomid(domidText ?? '', 'manager');
  if (!keyHex || !/^[0-9a-f]{64}$/.test(keyHex)) throw new VtpmError('EINVAL', 'the manager sent no 32-byte export key');
  const { front: stateLink, params } = await connectToManager(domain, manager);
  log(`state link to the manager (domain ${manager}) connected`);
  const guest = await serveQemuGuest({ version: o.tpm, state: { link: params, uuid: o.uuid, timeoutMs: STATE_TIMEOUT_MS }, ctrlPath: o.ctrlPath, exportKey: Buffer.from(keyHex, 'hex'), log });
  let stopping = false;
  const stop = async (why: string, code = 0) => {
    if (stopping) return;
    stopping = true;
    log(`stopping (${why})`);
    await guest.stop();
    await stateLink.close().catch((e) => log(`state link close: ${(e as Error).message}`));
    await domain.leave().catch(() => {});
    process.exit(code);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
  // SIGUSR1: vtpm suspend (as for a tpm0 guest: exit 0 once the state is with the manager).
  process.on('SIGUSR1', () => {
    if (stopping) return;
    stopping = true;
    log('suspending');
    void guest.suspend().then(
      (bytes) => log(`suspended: ${bytes} bytes of volatile state stored with the manager`),
      (e) => {
        log(describeError(e));
        return SUSPEND_FAILED;
      },
    ).then(async (code) => {
      await stateLink.close().catch((e) => log(`state link close: ${(e as Error).message}`));
      await domain.leave().catch(() => {});
      process.exit(typeof code === 'number' ? code : 0);
    });
  });
  domain.onLost(() => void stop('authority lost', 1));
  void guest.failed.then((e) => {
    if (!stopping) log(describeError(e));
    return stop('engine thread ended', 1);
  });
}

main().catch((e) => {
  log(describeError(e));
  reportFailure(e);
  process.exit(1);
});
