// frontd: the host's one front-end process, serving every guest's tpm0 (Linux xen-tpmfront,
// once per guest, but one process per host): each guest is its own domain and its own FUSE
// mount, all served by a small fixed pool of FUSE threads (fuse-pool.ts). The toolstack
// drives it over a unix socket, DIR/frontd.sock (0600), in CBOR frames (drivers/base/rpc.ts);
// every request carries `frontd: FRONTD_VERSION` and its fields are checked before use:
//   attach {name}                          → {domid}   joins the authority as guest-NAME
//   connect {name, backendId, timeoutMs?}  → {node, rmNode?}   xenbus handshake with that
//                                            vtpmd, mount DIR/NAME/dev; resolves once it serves
//   detach {name}                          → {}        unmount, xenbus close, leave the domain
//   list                                   → {guests: [{name, domid, state, backendId?, node?, rmNode?, thread?, why?}],
//                                              load: [nodes served by each FUSE thread]}
// Events to every client: {ev: 'guest', guest: {name, domid, state, why, ...}} when a guest's
// node stops working by itself (its vtpmd went away: 'disconnected'; its node or domain
// failed: 'failed'); it answers EIO until detached.
//
//   tsx drivers/tpmfront/frontd.ts --dir DIR [--threads N]
//
// Readiness (drivers/host/daemon.ts): {socket, pid, threads} once the socket serves. A
// restart clears the dead mounts a killed frontd left below DIR (its own only). SIGTERM /
// SIGINT: detach every guest, exit 0.
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import type { Msg } from '../base/frame.ts';
import { describeError, VtpmError } from '../base/errors.ts';
import { dropStartupGarbage } from '../base/modules.ts';
import { RpcServer } from '../base/rpc.ts';
import * as field from '../base/validate.ts';
import { reportFailure, reportReady } from '../host/daemon.ts';
import { DEFAULT_CONNECT_MS, FRONTD_MOUNT_SOURCE, FRONTD_VERSION, GUEST_NAME, MAX_CONNECT_MS, frontdSocket } from './frontd-client.ts';
import { Guests } from './frontd-guests.ts';
import { FusePool } from './fuse-pool.ts';
import { clearMountsBelow } from './mountpoint.ts';

const NAME_RULE = { pattern: GUEST_NAME, what: 'a guest name (1-32 of a-z 0-9 _ -, starting with a letter or digit)' };
const MAX_DOMID = 0x7fef;
const STOP_LIMIT_MS = 30_000;

function log(msg: string): void {
  console.error(`${new Date().toISOString()} frontd: ${msg}`);
}

type Op = (g: Guests, m: Msg, pool: FusePool) => Promise<Msg | void> | Msg;

const OPS: Record<string, Op> = {
  attach: (g, m) => g.attach(field.str(m, 'name', NAME_RULE)),
  connect: (g, m) => {
    const timeoutMs = m.timeoutMs === undefined ? DEFAULT_CONNECT_MS : field.int(m, 'timeoutMs', 100, MAX_CONNECT_MS);
    return g.connect(field.str(m, 'name', NAME_RULE), field.int(m, 'backendId', 1, MAX_DOMID), timeoutMs);
  },
  detach: (g, m) => g.detach(field.str(m, 'name', NAME_RULE)),
  list: (g, _m, pool) => ({ guests: g.list() as unknown as Msg[], load: pool.load }),
};

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { dir: { type: 'string' }, threads: { type: 'string' } } });
  if (!values.dir || (values.threads !== undefined && !/^\d{1,3}$/.test(values.threads))) {
    throw new VtpmError('EINVAL', 'usage: frontd --dir DIR [--threads N]');
  }
  const dir = resolve(values.dir);
  const pool = new FusePool({ threads: values.threads === undefined ? undefined : Number(values.threads), source: FRONTD_MOUNT_SOURCE });
  let server: RpcServer<null> | undefined;
  const guests = new Guests(dir, pool, log, (info) => {
    for (const c of server?.clients ?? []) c.event('guest', { guest: info as unknown as Msg });
  });
  const socket = frontdSocket(dir);
  server = await RpcServer.listen<null>({
    path: socket,
    what: 'a front-end process (frontd)',
    accept: () => null,
    handle: (m) => {
      const op = OPS[m.op as string];
      if (!op) throw new VtpmError('EINVAL', `unknown operation ${JSON.stringify(String(m.op).slice(0, 40))}`);
      if (m.frontd !== FRONTD_VERSION) throw new VtpmError('EPROTO', `frontd protocol ${String(m.frontd)} (this frontd speaks ${FRONTD_VERSION})`);
      return op(guests, m, pool);
    },
  });
  // Only now (the socket is ours: no other frontd serves this dir) are mounts of ours below
  // it leftovers of a killed one.
  for (const at of clearMountsBelow(dir, FRONTD_MOUNT_SOURCE)) log(`cleared the dead mount at ${at}`);

  let stopping = false;
  const stop = async (why: string) => {
    if (stopping) return;
    stopping = true;
    log(`stopping (${why}): detaching ${guests.size} guest(s)`);
    // A guest stuck in its handshake delays its detach; past this, exit anyway (the exit
    // hook of mountpoint.ts still unmounts every node lazily).
    setTimeout(() => {
      log(`guests still detaching after ${STOP_LIMIT_MS} ms: exiting`);
      process.exit(1);
    }, STOP_LIMIT_MS).unref();
    server.close();
    await guests.detachAll();
    await pool.close().catch((e) => log(`FUSE pool: ${describeError(e)}`));
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
  reportReady({ ok: true, info: { socket, pid: process.pid, threads: pool.threads } });
  log(`serving ${socket} (${pool.threads} FUSE thread(s) at most)`);
  dropStartupGarbage();
}

main().catch((e) => {
  log(describeError(e));
  reportFailure(e);
  process.exit(1);
});
