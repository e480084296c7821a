// The hosts this host migrates instances to and accepts them from (`vtpm host trust add
// NAME FILE`): a name → identity document map, sealed under the root key in the state dir
// (trusted.sealed), so nobody who can only write files adds a host. Trust is keyed on the
// identity's signing-key fingerprint; both ends of a migration must trust each other.
import { join } from 'node:path';
import { VtpmError } from '../../drivers/base/errors.ts';
import { bytesField, checkRecord, textField } from '../store/sealed-file.ts';
import { readSealedRecord, writeSealedRecord } from '../store/sealed-record.ts';
import { verifyIdentity, type PeerIdentity } from './identity.ts';

const FILE = 'trusted.sealed';
const MAX_FILE = 1 << 20;
const MAX_HOSTS = 256;
export const TRUST_NAME = /^[a-z0-9][a-z0-9._-]{0,63}$/;

export interface TrustedHost {
  name: string;
  fingerprint: string;
  host: string;
}

export class TrustList {
  private constructor(
    private readonly file: string,
    private readonly rootKey: Uint8Array,
    private hosts: Map<string, PeerIdentity>,
  ) {}

  static open(stateDir: string, rootKey: Uint8Array): TrustList {
    const file = join(stateDir, FILE);
    const what = `the trusted hosts record (${file})`;
    const stored = readSealedRecord(file, rootKey, 'trusted hosts', MAX_FILE);
    const hosts = new Map<string, PeerIdentity>();
    if (stored !== undefined) {
      const f = checkRecord(stored, what, ['hosts']);
      if (!Array.isArray(f.hosts) || f.hosts.length > MAX_HOSTS) throw new VtpmError('EINTEGRITY', `${what}: field hosts is not a list of at most ${MAX_HOSTS}`);
      for (const h of f.hosts) {
        const r = checkRecord(h, what, ['name', 'document']);
        hosts.set(textField(r, 'name', what, 64, TRUST_NAME), verifyIdentity(bytesField(r, 'document', what)));
      }
    }
    return new TrustList(file, rootKey, hosts);
  }

  list(): TrustedHost[] {
    return [...this.hosts].map(([name, p]) => ({ name, fingerprint: p.fingerprint, host: p.host }));
  }

  /** Trust the host whose identity document this is, under `name` (replacing that name's). */
  add(name: string, document: Uint8Array): TrustedHost {
    if (!TRUST_NAME.test(name)) throw new VtpmError('EINVAL', `trusted host name ${JSON.stringify(name.slice(0, 70))}: use 1-64 of a-z 0-9 . _ -`);
    const peer = verifyIdentity(document);
    const next = new Map(this.hosts);
    next.set(name, peer);
    if (next.size > MAX_HOSTS) throw new VtpmError('EOVERSIZE', `at most ${MAX_HOSTS} trusted hosts`);
    this.save(next);
    return { name, fingerprint: peer.fingerprint, host: peer.host };
  }

  remove(name: string): void {
    if (!this.hosts.has(name)) throw new VtpmError('ENOENT', `no trusted host ${name}`);
    const next = new Map(this.hosts);
    next.delete(name);
    this.save(next);
  }

  /** The trusted name of the host holding this identity, or undefined. The document must be
   *  the one trusted (same keys), not only the same signing key. */
  nameOf(peer: PeerIdentity): string | undefined {
    for (const [name, p] of this.hosts) if (p.fingerprint === peer.fingerprint && Buffer.compare(p.document, peer.document) === 0) return name;
    return undefined;
  }

  private save(next: Map<string, PeerIdentity>): void {
    writeSealedRecord(this.file, this.rootKey, 'trusted hosts', { hosts: [...next].map(([name, p]) => ({ name, document: Buffer.from(p.document) })) });
    this.hosts = next;
  }
}
