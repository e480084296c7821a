// The manager's control API (what `vtpm` speaks): one table of operations over the RPC
// socket (drivers/base/rpc.ts), RUN/manager.sock, 0600. Every field of every request is
// checked here before the host sees it; a refused request gets an error reply and the
// manager goes on.
import type { Msg } from '../drivers/base/frame.ts';
import { RpcServer, type RpcPeer } from '../drivers/base/rpc.ts';
import { MAX_DOCUMENT } from './migration/identity.ts';
import { TRUST_NAME } from './migration/trust.ts';
import * as field from '../drivers/base/validate.ts';
import { VtpmError } from '../drivers/base/errors.ts';
import type { Host } from './host.ts';

/** Protocol of the control API (inside the frame's own version). */
export const CONTROL_VERSION = 1;
/** The warm pool's size (`vtpm host start --warm N`, warm-pool.ts): its default, and its
 *  bound (a pool is a few processes of ~16 MB each: a bound, not a density knob). */
export const DEFAULT_WARM = 2;
export const MAX_WARM = 64;
/** Instance names: what the guest is called on this host (and its node directory). */
export const INSTANCE_NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const NAME_RULE = { pattern: INSTANCE_NAME, what: 'an instance name (1-32 of a-z 0-9 _ -, starting with a letter or digit)' };
const GROUP_RULE = { pattern: INSTANCE_NAME, what: 'a group name (1-32 of a-z 0-9 _ -, starting with a letter or digit)' };

type Op = (host: Host, m: Msg, peer: RpcPeer<null>) => Msg | void | Promise<Msg | void>;
/** How the guest reaches its TPM: a tpm0 node (raw or native FUSE front end), or QEMU. */
const GUESTS = ['raw', 'native', 'qemu'] as const;
const TRUST_RULE = { pattern: TRUST_NAME, what: 'a trusted host name (1-64 of a-z 0-9 . _ -)' };

export const OPS: Record<string, Op> = {
  ping: () => ({ control: CONTROL_VERSION }),
  status: (host) => host.status(),
  create: (host, m) =>
    host.create(field.str(m, 'name', NAME_RULE), field.oneOf(m, 'tpm', ['1.2', '2.0'] as const, '2.0'), m.group === undefined ? undefined : field.str(m, 'group', GROUP_RULE)),
  destroy: (host, m) => host.destroy(field.str(m, 'name', NAME_RULE)),
  start: (host, m) => host.start(field.str(m, 'name', NAME_RULE), field.oneOf(m, 'fuse', GUESTS, 'raw')),
  stop: (host, m) => host.stopInstance(field.str(m, 'name', NAME_RULE)),
  suspend: (host, m) => host.suspend(field.str(m, 'name', NAME_RULE)),
  resume: (host, m) => host.resume(field.str(m, 'name', NAME_RULE), field.oneOf(m, 'fuse', GUESTS, 'raw')),
  list: (host) => ({ instances: host.list() }),
  identity: (host) => host.migration.identity() as unknown as Msg,
  'trust-add': async (host, m) => ({ ...(await host.migration.trustAdd(field.str(m, 'name', TRUST_RULE), field.bytes(m, 'document', MAX_DOCUMENT))) }),
  'trust-remove': async (host, m) => {
    await host.migration.trustRemove(field.str(m, 'name', TRUST_RULE));
    return {};
  },
  'trust-list': (host) => ({ hosts: host.migration.trustList() }),
  // Progress goes to the caller as events while the migration runs.
  migrate: async (host, m, peer) => ({
    ...(await host.migration.migrate(field.str(m, 'name', NAME_RULE), field.str(m, 'to', { max: 300, what: 'HOST:PORT' }), (phase, done, total) => peer.event('progress', { phase, done, total }))),
  }),
  // Attestation (manager/attest): an instance's chain, the hardware key a verifier trusts, the launch log.
  attest: (host, m) => {
    const name = field.str(m, 'name', NAME_RULE);
    const i = host.list().find((r) => r.name === name);
    if (!i) throw new VtpmError('ENOENT', `no instance ${name} on this host (vtpm list shows them)`);
    return host.attestation((a) => ({ document: Buffer.from(a.document({ name, uuid: i.uuid, tpm: i.tpm, created: i.created })) }));
  },
  'hw-ek': (host) => host.attestation(async (a) => {
    const k = await a.hardwareKey();
    return { public: Buffer.from(k.public), pem: k.pem, name: Buffer.from(k.name) };
  }),
  // A verifier's credential challenge for the hardware EK, answered by the hardware TPM.
  activate: (host, m) => {
    const name = field.str(m, 'name', NAME_RULE);
    const i = host.list().find((r) => r.name === name);
    if (!i) throw new VtpmError('ENOENT', `no instance ${name} on this host (vtpm list shows them)`);
    const uuid = field.optStr(m, 'uuid', { max: 36 });
    if (uuid !== undefined && uuid !== i.uuid) throw new VtpmError('EINVAL', `the challenge is for instance ${uuid}, not ${name} (${i.uuid})`);
    const cred = { credentialBlob: field.bytes(m, 'credentialBlob', 256), encryptedSecret: field.bytes(m, 'encryptedSecret', 512) };
    return host.attestation(async (a) => ({ secret: Buffer.from(await a.activate(cred)) }));
  },
  eventlog: (host) => host.attestation(async (a) => ({ ...(await a.eventLog()) }) as unknown as Msg),
  shutdown: (host) => {
    // Answer first, then stop: the caller waits for the socket to go away.
    setImmediate(() => void host.stop('requested by the control API'));
    return { stopping: true };
  },
};

export function serveControl(host: Host, path: string, log: (line: string) => void): Promise<RpcServer<null>> {
  return RpcServer.listen<null>({
    path,
    what: 'a manager',
    accept: () => null,
    handle: (m, peer) => {
      const op = OPS[m.op as string];
      if (!op) throw new VtpmError('EINVAL', `unknown operation ${JSON.stringify(String(m.op).slice(0, 40))}`);
      if (m.control !== CONTROL_VERSION) throw new VtpmError('EPROTO', `control API version ${String(m.control)} (this manager speaks ${CONTROL_VERSION})`);
      const out = op(host, m, peer);
      if (m.op !== 'ping' && m.op !== 'status' && m.op !== 'list') log(`control: ${String(m.op)}${typeof m.name === 'string' ? ` ${m.name}` : ''}`);
      return out;
    },
  });
}
