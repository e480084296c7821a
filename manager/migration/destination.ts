// The receiving end (`vtpm host start --migration-listen ADDR:PORT`): a TCP listener that
// takes instances from trusted hosts and answers their questions about past migrations.
//
// A connection: our hello (identity document, a fresh nonce) → the peer's offer (its
// identity, the instance, the ephemeral key, its signature over the transcript) → the
// ciphertext in chunks → end (the tag). Checked before anything is written: the peer is
// trusted, the signature covers this connection's nonce (a replayed stream fails here),
// the ciphertext opens with the key only our TPM can derive, every field is in bounds. Then,
// one table change at a time: the record is added marked `migration: 'in'`, the blobs
// stored under a key of this host, the instance started (from its volatile state), and
// the mark cleared — the instance lives here from that commit on — and only then the signed
// acknowledgement goes back. A mark found at start-up is an import that never finished:
// dropped (its source still holds the instance).
import * as net from 'node:net';
import { createDecipheriv, randomBytes } from 'node:crypto';
import { decode } from 'cbor-x';
import { VtpmError, describeError } from '../../drivers/base/errors.ts';
import type { Msg } from '../../drivers/base/frame.ts';
import * as field from '../../drivers/base/validate.ts';
import { BLOB_NAME, InstanceStore, MAX_BLOB, UUID } from '../store/blob-store.ts';
import { newKey } from '../store/crypto.ts';
import { isPlainRecord } from '../store/sealed-file.ts';
import { CHUNK, Channel, type Address } from './channel.ts';
import { verifyIdentity } from './identity.ts';
import type { MigrationHost } from './host-access.ts';
import { ackMessage, answerMessage, checkSignature, digestOf, offerMessage, streamKey, transcriptHash } from './wrap.ts';

const STEP_MS = 30_000;
/** The largest migration payload accepted (an instance's blobs: well under 1 MiB each). */
export const MAX_PAYLOAD = 8 << 20;
const MAX_BLOBS = 64;
const INSTANCE_NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const MAX_CONNECTIONS = 8;
/** How long a refused source may go on sending before we cut it off. */
const ABORT_LINGER_MS = 5000;

export async function listenForMigrations(h: MigrationHost, at: Address): Promise<net.Server> {
  let open = 0;
  const server = net.createServer((sock) => {
    if (open >= MAX_CONNECTIONS) return sock.destroy();
    open++;
    const ch = new Channel(sock, `${sock.remoteAddress}:${sock.remotePort}`);
    serve(h, ch)
      .catch((e) => {
        h.log(`migration connection from ${ch.peer}: ${describeError(e)}`);
        if (!ch.isClosed) {
          try {
            ch.send('abort', { msg: describeError(e).slice(0, 500) });
          } catch {
            // the peer is gone: nothing to tell it
          }
          ch.linger(ABORT_LINGER_MS);
        }
      })
      .finally(() => open--);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new VtpmError('EBUSY', `cannot listen for migrations on ${at.host}:${at.port}: ${e.message}`, { cause: e })));
    server.listen(at.port, at.host, () => resolve());
  });
  server.on('error', (e) => h.log(`migration listener: ${e.message}`));
  h.log(`listening for migrations on ${at.host}:${at.port}`);
  return server;
}

async function serve(h: MigrationHost, ch: Channel): Promise<void> {
  const nonce = randomBytes(32);
  ch.send('hello', { identity: Buffer.from(h.identity.document), nonce });
  const first = await ch.next(['offer', 'query'], STEP_MS);
  if (first.t === 'query') return answer(h, ch, first);
  return receive(h, ch, first, nonce);
}

/** A source settling a migration: do we hold `uuid` as a live instance? Signed, with its nonce. */
async function answer(h: MigrationHost, ch: Channel, q: Msg): Promise<void> {
  const uuid = field.str(q, 'uuid', { pattern: UUID, what: 'an instance uuid' });
  const nonce = field.bytes(q, 'nonce', 32);
  // In exclusive: an import of it still under way finishes (or fails) first.
  const sig = await h.exclusive(async () => {
    const rec = h.record({ uuid });
    const has = rec !== undefined && rec.meta.migration === undefined;
    return { has, sig: await h.identity.sign(digestOf(answerMessage(uuid, nonce, has))) };
  });
  ch.send('answer', { has: sig.has, sig: Buffer.from(sig.sig) });
  ch.close();
}

async function receive(h: MigrationHost, ch: Channel, offer: Msg, nonce: Uint8Array): Promise<void> {
  const source = verifyIdentity(field.bytes(offer, 'identity', 4096));
  const from = h.trust.nameOf(source);
  if (!from) throw new VtpmError('EPERM', `host ${source.host} (fingerprint ${source.fingerprint}) is not trusted here`);
  const uuid = field.str(offer, 'uuid', { pattern: UUID, what: 'an instance uuid' });
  const name = field.str(offer, 'name', { pattern: INSTANCE_NAME, what: 'an instance name' });
  const tpm = field.oneOf(offer, 'tpm', ['1.2', '2.0'] as const);
  const created = field.int(offer, 'created', 0, Number.MAX_SAFE_INTEGER);
  const size = field.int(offer, 'size', 1, MAX_PAYLOAD);
  const chunks = field.int(offer, 'chunks', 1, Math.ceil(MAX_PAYLOAD / CHUNK));
  if (chunks !== Math.ceil(size / CHUNK)) throw new VtpmError('EPROTO', `${chunks} chunks cannot hold ${size} bytes`);
  const iv = field.bytes(offer, 'iv', 12);
  const sig = field.bytes(offer, 'sig', 128);
  const ephMsg = offer.eph;
  if (!isPlainRecord(ephMsg)) throw new VtpmError('EINVAL', 'field eph: expected a point');
  const eph = { x: field.bytes(ephMsg, 'x', 32), y: field.bytes(ephMsg, 'y', 32) };
  if (iv.length !== 12 || eph.x.length !== 32 || eph.y.length !== 32) throw new VtpmError('EINVAL', 'field iv or eph has the wrong length');
  const th = transcriptHash({ source: source.document, destination: h.identity.document, nonce, uuid, name, tpm, created, eph, size, iv });
  checkSignature(source.signingKey, offerMessage(th), sig, `the offer from ${from}`);
  if (h.record({ uuid }) || h.record({ name })) throw new VtpmError('EBUSY', `an instance ${name} or ${uuid} already exists here`);
  h.log(`receiving instance ${name} (${uuid}, TPM ${tpm}) from ${from} at ${ch.peer}`);

  const ct = Buffer.alloc(size);
  for (let i = 0; i < chunks; i++) {
    const m = await ch.next('chunk', STEP_MS);
    const data = field.bytes(m, 'data', CHUNK);
    if (field.int(m, 'i', 0, chunks - 1) !== i || data.length !== Math.min(CHUNK, size - i * CHUNK)) throw new VtpmError('EPROTO', `chunk ${i} out of order or of the wrong size`);
    ct.set(data, i * CHUNK);
  }
  const tag = field.bytes(await ch.next('end', STEP_MS), 'tag', 16);
  const z = await h.exclusive(() => h.identity.zgen(eph));
  let payload: Buffer;
  try {
    const d = createDecipheriv('aes-256-gcm', streamKey(z, th), iv, { authTagLength: 16 });
    d.setAAD(th);
    d.setAuthTag(tag);
    payload = Buffer.concat([d.update(ct), d.final()]);
  } catch (e) {
    throw new VtpmError('EINTEGRITY', 'the migration stream failed authentication: it was altered on the way', { cause: e });
  }
  const blobs = parsePayload(payload);

  await h.exclusive(async () => {
    if (ch.isClosed) throw new VtpmError('ECLOSED', `${ch.peer} went away before the import`);
    if (h.record({ uuid }) || h.record({ name })) throw new VtpmError('EBUSY', `an instance ${name} or ${uuid} already exists here`);
    const key = newKey();
    await h.addRecord({ uuid, name, tpm, key, created, blobs: {}, meta: { migration: 'in', migrationFrom: from } });
    try {
      const store = new InstanceStore({ stateDir: h.stateDir, uuid, key, minVersions: {} });
      for (const [n, b] of Object.entries(blobs)) store.store(n, b);
      await h.patchRecord(uuid, { blobs: store.versions() });
      await h.startRun(name);
      if (ch.isClosed) throw new VtpmError('ECLOSED', `${ch.peer} went away during the import`);
      const { migration: _m, migrationFrom: _f, suspended: _s, ...meta } = h.record({ uuid })!.meta;
      await h.patchRecord(uuid, { meta }); // from this commit on the instance lives here
    } catch (e) {
      await h.stopRun(name).catch(() => undefined);
      await h.dropRecord(uuid).catch((e2) => h.log(`dropping the failed import of ${name}: ${describeError(e2)}`));
      throw e;
    }
  });
  h.log(`instance ${name} (${uuid}) arrived from ${from} and runs here`);
  const ackSig = await h.exclusive(() => h.identity.sign(digestOf(ackMessage(th))));
  if (!ch.isClosed) ch.send('ack', { sig: Buffer.from(ackSig) });
  ch.close();
}

function parsePayload(payload: Buffer): Record<string, Uint8Array> {
  let p: unknown;
  try {
    p = decode(payload);
  } catch (e) {
    throw new VtpmError('EPROTO', 'the migration payload is not CBOR', { cause: e });
  }
  if (!isPlainRecord(p) || p.v !== 1 || !isPlainRecord(p.blobs)) throw new VtpmError('EPROTO', 'the migration payload is not a v1 blob map');
  const entries = Object.entries(p.blobs);
  if (entries.length > MAX_BLOBS) throw new VtpmError('EOVERSIZE', `the migration payload has ${entries.length} blobs (at most ${MAX_BLOBS})`);
  const out: Record<string, Uint8Array> = {};
  for (const [n, b] of entries) {
    if (!BLOB_NAME.test(n) || !(b instanceof Uint8Array) || b.length > MAX_BLOB) throw new VtpmError('EPROTO', `the migration payload has a bad blob ${JSON.stringify(n.slice(0, 40))}`);
    out[n] = b;
  }
  return out;
}
