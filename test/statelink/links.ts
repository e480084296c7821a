// Test fixture: state links between this test process (vtpmd's side: a guest domain whose
// xenbus front end + tpmif front end carry the LinkStateStore) and a link-server.ts daemon
// (the manager's side, serving in a worker thread), over a real authority.
import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decode } from 'cbor-x';
import { startDaemon, stopProcess } from '../../drivers/host/daemon.ts';
import { startAuthority } from '../../drivers/xen/authority-launch.ts';
import { Domain } from '../../drivers/xen/domain.ts';
import { XenbusFront } from '../../drivers/tpmfront/xenbus-front.ts';
import { TpmifFront } from '../../drivers/tpmfront/tpmif-front.ts';
import { LinkStateStore } from '../../drivers/statelink/client.ts';

export interface Link {
  uuid: string;
  store: LinkStateStore;
  /** The tpmif front end the store uses, for raw requests. */
  front: TpmifFront;
  pid: number;
  /** The server's log lines so far. */
  logLines(): string[];
  /** One raw request; the decoded reply map. */
  raw(req: Uint8Array): Record<string, any>;
  close(): Promise<void>;
}

export interface LinkOptions {
  backend: 'instance' | 'dir';
  /** The backend's state dir (default: a fresh one under the fixture's dir). */
  state?: string;
  timeoutMs?: number;
}

export async function linkFixture() {
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-statelink-'));
  const auth = await startAuthority(dir);
  const guest = await Domain.join(dir, { name: 'statelink-vtpmd' });
  let devid = 0;
  return {
    dir,
    async open(o: LinkOptions): Promise<Link> {
      const n = devid++;
      const uuid = randomUUID();
      const log = join(dir, `server-${n}.log`);
      const state = o.state ?? join(dir, `state-${n}`);
      const d = await startDaemon(
        join(import.meta.dirname, 'link-server.ts'),
        ['--dir', dir, '--front', String(guest.domid), '--devid', String(n), '--uuid', uuid, '--backend', o.backend, '--state', state, '--key', randomBytes(32).toString('hex'), '--serverlog', log],
        { log: join(dir, `daemon-${n}.log`) },
      );
      const xf = await XenbusFront.start(guest, { backendId: Number(d.info.domid), devid: n, reconnect: false });
      const fl = await xf.connected(20_000);
      const front = TpmifFront.attach(fl.params, { timeoutMs: o.timeoutMs ?? 10_000 });
      return {
        uuid,
        store: new LinkStateStore(front, uuid),
        front,
        pid: d.pid,
        logLines: () => (existsSync(log) ? readFileSync(log, 'utf8').split('\n').filter((l) => l) : []),
        raw: (req) => decode(front.transmitSync(req, 0)) as Record<string, any>,
        async close() {
          front.close();
          await xf.close(2000).catch(() => {});
          await stopProcess(d.pid, 2000);
        },
      };
    },
    async done() {
      await guest.leave();
      await auth.stop();
      if (!process.env.STATELINK_KEEP) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The codes along an error's cause chain, outermost first. */
export function codeChain(e: unknown): string[] {
  const out: string[] = [];
  for (let c = e as { code?: unknown; cause?: unknown } | undefined; c && out.length < 12; c = c.cause as typeof c) out.push(String(c.code));
  return out;
}

/** What a synchronous call threw (or 'ok'). */
export function thrown(fn: () => unknown): unknown {
  try {
    fn();
    return 'ok';
  } catch (e) {
    return e;
  }
}
