// Migrating an instance away (`vtpm migrate NAME --to ADDR:PORT`), and settling a
// migration whose outcome this host does not know (a cut connection, a crash).
//
// Exactly one live copy: the instance is suspended and locked here (the table records
// `migration: 'out'` with the destination) before anything is sent; it is dropped here only
// after the destination's signed acknowledgement (it runs there), and unlocked only after
// the destination's signed answer that it does not hold it (or when nothing was offered).
// While neither is known the lock stays, survives a restart, and the manager keeps asking.
import { createCipheriv, randomBytes } from 'node:crypto';
import { encode } from 'cbor-x';
import { VtpmError, describeError } from '../../drivers/base/errors.ts';
import * as field from '../../drivers/base/validate.ts';
import { InstanceStore } from '../store/blob-store.ts';
import type { InstanceRecord } from '../store/table.ts';
import { CHUNK, Channel, parseAddress, type Address } from './channel.ts';
import { verifyIdentity, type PeerIdentity } from './identity.ts';
import { ackMessage, answerMessage, checkSignature, digestOf, ephemeralFor, offerMessage, streamKey, transcriptHash } from './wrap.ts';
import type { MigrationHost } from './host-access.ts';

const CONNECT_MS = 10_000;
const STEP_MS = 30_000;
/** The destination imports and starts the instance before it acknowledges. */
const ACK_MS = 120_000;

export type Progress = (phase: string, done: number, total: number) => void;

export interface MigrationResult {
  name: string;
  uuid: string;
  to: string;
  peer: string;
  bytes: number;
  ms: number;
}

/** Connect, read the destination's hello, and check it is the host we trust. */
async function greet(h: MigrationHost, to: Address): Promise<{ ch: Channel; peer: PeerIdentity; trusted: string; nonce: Uint8Array }> {
  const ch = await Channel.connect(to, CONNECT_MS);
  try {
    const hello = await ch.next('hello', STEP_MS);
    const peer = verifyIdentity(field.bytes(hello, 'identity', 4096));
    const nonce = field.bytes(hello, 'nonce', 32);
    if (nonce.length !== 32) throw new VtpmError('EPROTO', 'the destination sent a nonce that is not 32 bytes');
    const trusted = h.trust.nameOf(peer);
    if (!trusted) {
      ch.send('abort', { msg: 'this host does not trust you' });
      throw new VtpmError('EPERM', `the manager at ${ch.peer} (host ${peer.host}, fingerprint ${peer.fingerprint}) is not a trusted host here: vtpm host trust add NAME FILE, with the file its vtpm host identity wrote`);
    }
    return { ch, peer, trusted, nonce };
  } catch (e) {
    ch.destroy();
    throw e;
  }
}

/** The instance's live blobs, decrypted (it is not running: nothing changes them). */
function readBlobs(stateDir: string, rec: InstanceRecord): Record<string, Buffer> {
  const store = new InstanceStore({ stateDir, uuid: rec.uuid, key: rec.key, minVersions: rec.blobs });
  const out: Record<string, Buffer> = {};
  for (const name of Object.keys(rec.blobs)) {
    const b = store.load(name);
    if (b) out[name] = Buffer.from(b);
  }
  return out;
}

export async function migrateOut(h: MigrationHost, name: string, toText: string, progress: Progress): Promise<MigrationResult> {
  const t0 = performance.now();
  const to = parseAddress(toText);
  progress('connecting', 0, 1);
  const { ch, peer, trusted, nonce } = await greet(h, to);
  let offered = false;
  let rec: InstanceRecord;
  try {
    // The lock: from here this host does not run the instance until the outcome is known.
    rec = await h.exclusive(async () => {
      const r = h.record({ name });
      if (!r) throw new VtpmError('ENOENT', `no instance ${name} on this host (vtpm list shows them)`);
      if (r.meta.migration) throw new VtpmError('EBUSY', `instance ${name} is already migrating to ${String(r.meta.migrationTo)}`);
      progress('suspending', 0, 1);
      await h.quiesce(name);
      await h.patchRecord(r.uuid, { meta: { ...h.record({ name })!.meta, migration: 'out', migrationTo: `${to.host}:${to.port}`, migrationPeer: peer.fingerprint } });
      return h.record({ name })!;
    });
  } catch (e) {
    ch.destroy();
    throw e;
  }
  h.log(`migrating ${name} (${rec.uuid}) to ${trusted} at ${ch.peer}`);
  try {
    const payload = encode({ v: 1, blobs: readBlobs(h.stateDir, rec) });
    const { eph, z } = ephemeralFor(peer.migration.point!);
    const iv = randomBytes(12);
    const th = transcriptHash({ source: h.identity.document, destination: peer.document, nonce, uuid: rec.uuid, name: rec.name, tpm: rec.tpm, created: rec.created, eph, size: payload.length, iv });
    const c = createCipheriv('aes-256-gcm', streamKey(z, th), iv, { authTagLength: 16 });
    c.setAAD(th);
    const ct = Buffer.concat([c.update(payload), c.final()]);
    const sig = await h.exclusive(() => h.identity.sign(digestOf(offerMessage(th))));
    const chunks = Math.ceil(ct.length / CHUNK);
    ch.send('offer', { identity: Buffer.from(h.identity.document), uuid: rec.uuid, name: rec.name, tpm: rec.tpm, created: rec.created, eph: { x: Buffer.from(eph.x), y: Buffer.from(eph.y) }, size: ct.length, chunks, iv, sig: Buffer.from(sig) });
    offered = true;
    for (let i = 0; i < chunks; i++) {
      ch.send('chunk', { i, data: ct.subarray(i * CHUNK, (i + 1) * CHUNK) });
      progress('sending', Math.min(ct.length, (i + 1) * CHUNK), ct.length);
    }
    ch.send('end', { tag: c.getAuthTag() });
    progress('destination importing', 0, 1);
    const ack = await ch.next('ack', ACK_MS);
    checkSignature(peer.signingKey, ackMessage(th), field.bytes(ack, 'sig', 128), `the acknowledgement from ${trusted}`);
    ch.close();
    // It runs there: only now does this host give its copy up.
    await h.exclusive(() => h.dropRecord(rec.uuid));
    const ms = performance.now() - t0;
    h.log(`migrated ${name} to ${trusted} at ${to.host}:${to.port} in ${ms.toFixed(0)} ms; its copy here is gone`);
    progress('done', 1, 1);
    return { name, uuid: rec.uuid, to: `${to.host}:${to.port}`, peer: trusted, bytes: ct.length, ms };
  } catch (e) {
    ch.destroy();
    const why = describeError(e);
    if (!offered) {
      await h.exclusive(() => unlock(h, rec.uuid));
      throw new VtpmError(isCode(e), `migration of ${name} failed before anything was sent (${why}); it stays here: ${again(rec)} ${name}`, { cause: e });
    }
    h.log(`migration of ${name} interrupted (${why}); asking ${to.host}:${to.port} whether it has the instance`);
    const outcome = await settle(h, rec.uuid).catch((e2) => {
      h.scheduleSettle(rec.uuid);
      throw new VtpmError('EIO', `migration of ${name} interrupted (${why}) and its outcome is not known yet (${describeError(e2)}): it stays locked here and the manager keeps asking ${to.host}:${to.port}`, { cause: e });
    });
    if (outcome === 'moved') return { name, uuid: rec.uuid, to: `${to.host}:${to.port}`, peer: trusted, bytes: 0, ms: performance.now() - t0 };
    throw new VtpmError(isCode(e), `migration of ${name} failed (${why}); the destination does not have it, so it stays here: ${again(rec)} ${name}`, { cause: e });
  }
}

/** How the user runs it here again. */
const again = (rec: InstanceRecord) => (rec.meta.suspended === true ? 'vtpm resume' : 'vtpm start');
const isCode = (e: unknown) => (e instanceof VtpmError ? e.code : 'EIO');

/** Clear the lock (nothing left this host, or the destination says it has nothing). */
async function unlock(h: MigrationHost, uuid: string): Promise<void> {
  const r = h.record({ uuid });
  if (!r) return;
  const { migration: _m, migrationTo: _t, migrationPeer: _p, ...meta } = r.meta;
  await h.patchRecord(uuid, { meta });
}

/** Ask the destination of a locked instance whether it holds it (a signed answer to our
 *  nonce), and finish accordingly: 'moved' (dropped here) or 'kept' (unlocked here). */
export async function settle(h: MigrationHost, uuid: string): Promise<'moved' | 'kept'> {
  const rec = h.record({ uuid });
  if (!rec || rec.meta.migration !== 'out') return 'kept';
  const to = parseAddress(String(rec.meta.migrationTo));
  const { ch, peer } = await greet(h, to);
  try {
    if (peer.fingerprint !== rec.meta.migrationPeer) throw new VtpmError('EPERM', `the manager at ${ch.peer} is not the host ${rec.name} was migrating to (fingerprint ${peer.fingerprint})`);
    const nonce = randomBytes(32);
    ch.send('query', { uuid, nonce });
    const ans = await ch.next('answer', ACK_MS);
    const has = field.bool(ans, 'has', false);
    checkSignature(peer.signingKey, answerMessage(uuid, nonce, has), field.bytes(ans, 'sig', 128), `the answer from ${ch.peer}`);
    return await h.exclusive(async () => {
      const now = h.record({ uuid });
      if (!now || now.meta.migration !== 'out') return has ? 'moved' : 'kept';
      if (has) {
        await h.dropRecord(uuid);
        h.log(`instance ${rec.name} runs on ${ch.peer}: its copy here is gone`);
        return 'moved';
      }
      await unlock(h, uuid);
      h.log(`instance ${rec.name} is not on ${ch.peer}: unlocked here`);
      return 'kept';
    });
  } finally {
    ch.close();
  }
}
