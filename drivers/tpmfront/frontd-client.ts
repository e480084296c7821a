// Talking to the host's front-end process (frontd.ts) from outside: its protocol, starting
// it, and a client. The toolstack's order for one guest:
//   const fd = await startFrontd(runDir, { log })            // once per host
//   const c = await FrontdClient.connect(fd.socket)
//   const domid = await c.attach(name)                        // the guest's domain
//   ... start vtpmd for it (--front domid, or domid on its stdin) ...
//   const { node } = await c.connect(name, vtpmdDomid)        // DIR/NAME/dev/tpm0 serves
//   await c.detach(name)                                      // unmount, close, leave
import { join } from 'node:path';
import { VtpmError } from '../base/errors.ts';
import type { Msg } from '../base/frame.ts';
import { codeFile } from '../base/modules.ts';
import { RpcClient } from '../base/rpc.ts';
import { startDaemon, type StartedDaemon } from '../host/daemon.ts';
import type { GuestInfo } from './frontd-guests.ts';

export type { GuestInfo, GuestState } from './frontd-guests.ts';

/** Version of frontd's request protocol (inside the frame's own), sent as `frontd`. */
export const FRONTD_VERSION = 1;
/** Guest names: the node's directory under the run dir (the manager's instance names). */
export const GUEST_NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;
/** /proc/mounts' device name of frontd's mounts: a restarted frontd clears these only. */
export const FRONTD_MOUNT_SOURCE = 'vtpm-frontd';
/** Longest handshake a connect may ask for. */
export const MAX_CONNECT_MS = 120_000;
export const DEFAULT_CONNECT_MS = 15_000;

export function frontdSocket(dir: string): string {
  return join(dir, 'frontd.sock');
}

export interface StartedFrontd extends StartedDaemon {
  socket: string;
}

/** Start frontd for run dir `dir` (the authority must run there); resolves once it serves
 *  its socket. `script`: the daemon's entry (default: frontd beside this module, in the form
 *  this module runs in: the built JavaScript under build/, the TypeScript under tsx). */
export async function startFrontd(dir: string, o: { log: string; threads?: number; script?: string; timeoutMs?: number }): Promise<StartedFrontd> {
  const script = o.script ?? codeFile('drivers/tpmfront/frontd');
  const args = ['--dir', dir, ...(o.threads !== undefined ? ['--threads', String(o.threads)] : [])];
  const d = await startDaemon(script, args, { log: o.log, timeoutMs: o.timeoutMs ?? 30_000 });
  return { ...d, socket: String(d.info.socket) };
}

export class FrontdClient {
  private readonly troubleCbs: ((g: GuestInfo) => void)[] = [];
  private constructor(private readonly rpc: RpcClient) {}

  static async connect(socket: string): Promise<FrontdClient> {
    let self: FrontdClient | undefined;
    const rpc = await RpcClient.connect(socket, `the front-end process at ${socket}`, (m) => {
      if (m.ev === 'guest' && m.guest && typeof m.guest === 'object') for (const cb of self?.troubleCbs ?? []) cb(m.guest as GuestInfo);
    });
    return (self = new FrontdClient(rpc));
  }

  /** A guest's node stopped working by itself (state 'disconnected' or 'failed', with why):
   *  it answers EIO until detached. */
  onTrouble(cb: (g: GuestInfo) => void): void {
    this.troubleCbs.push(cb);
  }

  private async call(op: string, args: Msg, timeoutMs: number): Promise<Msg> {
    return this.rpc.request(op, { frontd: FRONTD_VERSION, ...args }, timeoutMs);
  }

  /** Join the authority as guest-NAME: its domid. */
  async attach(name: string): Promise<number> {
    return Number((await this.call('attach', { name }, 30_000)).domid);
  }

  /** Handshake with vtpmd's domain and mount the node; resolves once it serves. */
  async connect(name: string, backendId: number, timeoutMs = DEFAULT_CONNECT_MS): Promise<{ node: string; rmNode?: string }> {
    const r = await this.call('connect', { name, backendId, timeoutMs }, timeoutMs + 30_000);
    return { node: String(r.node), ...(typeof r.rmNode === 'string' ? { rmNode: r.rmNode } : {}) };
  }

  async detach(name: string): Promise<void> {
    await this.call('detach', { name }, 30_000);
  }

  async list(): Promise<GuestInfo[]> {
    return (await this.status()).guests;
  }

  /** The guests, and how many nodes each FUSE thread serves. */
  async status(): Promise<{ guests: GuestInfo[]; load: number[] }> {
    const r = await this.call('list', {}, 10_000);
    if (!Array.isArray(r.guests) || !Array.isArray(r.load)) throw new VtpmError('EPROTO', 'frontd answered list without guests and load');
    return { guests: r.guests as GuestInfo[], load: r.load as number[] };
  }

  /** The connection dropped (frontd exited). */
  onLost(cb: (e: VtpmError) => void): void {
    this.rpc.onLost(cb);
  }

  close(): Promise<void> {
    return this.rpc.end();
  }
}
