// The guests one front-end process serves (frontd.ts): per guest its own domain (its own
// authority connection, as guest-NAME), its xenbus front end to its vtpmd, and its node
// DIR/NAME/dev/{tpm0,tpmrm0} served by the shared FUSE pool. Operations on one guest run one
// at a time; guests never wait for each other (a handshake that times out, a vtpmd that
// dies, fail that guest only: its node answers EIO until it is detached).
import { join } from 'node:path';
import { describeError, VtpmError } from '../base/errors.ts';
import { Domain } from '../xen/domain.ts';
import { tpmifBackendSpec } from './backend-tpmif.ts';
import type { FusePool, PoolNode } from './fuse-pool.ts';
import { XenbusFront } from './xenbus-front.ts';

export type GuestState = 'attached' | 'connecting' | 'connected' | 'disconnected' | 'failed' | 'detaching';

export interface GuestInfo {
  name: string;
  domid: number;
  state: GuestState;
  backendId?: number;
  node?: string;
  rmNode?: string;
  /** The FUSE thread serving its node (guests of one thread wait for each other's TPM). */
  thread?: number;
  /** Why the guest is disconnected or failed. */
  why?: string;
}

interface Guest {
  name: string;
  domain: Domain;
  state: GuestState;
  backendId?: number;
  xf?: XenbusFront;
  node?: PoolNode;
  why?: string;
}

export class Guests {
  private readonly guests = new Map<string, Guest>();
  /** Per name, the tail of its operations (each waits for the one before). */
  private readonly chains = new Map<string, Promise<unknown>>();

  constructor(
    private readonly dir: string,
    private readonly pool: FusePool,
    private readonly log: (line: string) => void,
    /** A guest's node stopped working by itself (its vtpmd went away, its node or domain
     *  failed): what the toolstack's supervisor wants to hear. */
    private readonly onTrouble: (info: GuestInfo) => void = () => undefined,
  ) {}

  get size(): number {
    return this.guests.size;
  }

  /** Join the authority as guest-NAME; its domid (the vtpmd is started for it). */
  attach(name: string): Promise<{ domid: number }> {
    return this.serial(name, async () => {
      const had = this.guests.get(name);
      if (had) throw new VtpmError('EBUSY', `guest ${name} is already attached (domain ${had.domain.domid})`);
      const domain = await Domain.join(this.dir, { name: `guest-${name}` });
      const g: Guest = { name, domain, state: 'attached' };
      this.guests.set(name, g);
      domain.onLost(() => {
        if (this.guests.get(name) !== g || g.state === 'detaching') return;
        this.fail(g, 'its authority connection was lost');
      });
      this.log(`${name}: attached as domain ${domain.domid}`);
      return { domid: domain.domid };
    });
  }

  /** Handshake with vtpmd (domain `backendId`) and mount the guest's node; resolves once it
   *  serves. On failure the guest is back to attached (a connect may be tried again). */
  connect(name: string, backendId: number, timeoutMs: number): Promise<{ node: string; rmNode?: string }> {
    return this.serial(name, async () => {
      const g = this.get(name);
      if (g.state !== 'attached') throw new VtpmError('EBUSY', `guest ${name} is ${g.state}, not waiting for a connect`);
      g.state = 'connecting';
      g.backendId = backendId;
      try {
        g.xf = await XenbusFront.start(g.domain, { backendId, reconnect: false });
        const link = await g.xf.connected(timeoutMs);
        g.xf.onDisconnect(() => {
          if (g.state !== 'connected') return;
          g.state = 'disconnected';
          g.why = `vtpmd (domain ${backendId}) went away`;
          this.log(`${name}: ${g.why}: its commands now fail with EIO`);
          this.onTrouble(this.info(g));
        });
        g.node = await this.pool.mount({ dir: join(this.dir, name, 'dev'), backend: tpmifBackendSpec(link.params), label: `guest-${name}` });
      } catch (e) {
        await this.unwind(g);
        g.state = 'attached';
        throw new VtpmError(e instanceof VtpmError && e.code === 'ETIMEDOUT' ? 'ETIMEDOUT' : 'EIO', `guest ${name} could not connect to vtpmd domain ${backendId}`, { cause: e });
      }
      g.state = 'connected';
      const node = g.node;
      void node.ended.then(() => {
        if (g.node === node && g.state !== 'detaching') this.fail(g, 'its node stopped serving');
      });
      this.log(`${name}: connected to vtpmd domain ${backendId}, serving ${node.path}${node.rmPath ? ` and ${node.rmPath}` : ''}`);
      return { node: node.path, ...(node.rmPath ? { rmNode: node.rmPath } : {}) };
    });
  }

  /** Unmount the node (clients holding it get ENOTCONN), close the device, leave the domain. */
  detach(name: string): Promise<void> {
    return this.serial(name, async () => {
      const g = this.get(name);
      g.state = 'detaching';
      await this.unwind(g);
      await g.domain.leave().catch((e) => this.log(`${name}: leaving domain ${g.domain.domid}: ${describeError(e)}`));
      this.guests.delete(name);
      this.log(`${name}: detached`);
    });
  }

  list(): GuestInfo[] {
    return [...this.guests.values()].map((g) => this.info(g));
  }

  private info(g: Guest): GuestInfo {
    return {
      name: g.name,
      domid: g.domain.domid,
      state: g.state,
      ...(g.backendId !== undefined ? { backendId: g.backendId } : {}),
      ...(g.node ? { node: g.node.path, ...(g.node.rmPath ? { rmNode: g.node.rmPath } : {}), thread: g.node.thread } : {}),
      ...(g.why ? { why: g.why } : {}),
    };
  }

  /** Detach every guest (SIGTERM). */
  async detachAll(): Promise<void> {
    await Promise.all([...this.guests.keys()].map((n) => this.detach(n).catch((e) => this.log(`${n}: detach: ${describeError(e)}`))));
  }

  private get(name: string): Guest {
    const g = this.guests.get(name);
    if (!g) throw new VtpmError('ENOENT', `no guest ${name} attached`);
    return g;
  }

  private fail(g: Guest, why: string): void {
    g.state = 'failed';
    g.why = why;
    this.log(`${g.name}: ${why}`);
    this.onTrouble(this.info(g));
  }

  /** Unmount (first: a thread blocked on this guest's vtpmd is woken by the port closing
   *  just after) and close the xenbus device; what fails is logged, the rest still runs. */
  private async unwind(g: Guest): Promise<void> {
    const node = g.node;
    const xf = g.xf;
    g.node = undefined;
    g.xf = undefined;
    const unmounted = node?.close().catch((e) => this.log(`${g.name}: unmount: ${describeError(e)}`));
    await xf?.close().catch((e) => this.log(`${g.name}: xenbus close: ${describeError(e)}`));
    await unmounted;
  }

  private serial<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.chains.get(name) ?? Promise.resolve();
    const run = prev.then(fn, fn);
    const tail = run.catch(() => undefined);
    this.chains.set(name, tail);
    void tail.then(() => {
      if (this.chains.get(name) === tail) this.chains.delete(name);
    });
    return run;
  }
}
