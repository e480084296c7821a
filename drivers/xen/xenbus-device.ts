// What both ends of a xenbus device keep (drivers/tpmfront/xenbus-front.ts and
// drivers/tpmback/xenbus-back.ts): the state they publish under their own directory, the
// link once Connected, the handshake step run serially on every watch, the waiters for
// Connected and Closed, and the disconnect callbacks.
import { VtpmError } from '../base/errors.ts';
import type { Domain } from './domain.ts';
import type { XenStore } from './xenstore-client.ts';
import { XenbusState as S } from './xenbus-common.ts';

/** A peer's published state (0 when it is gone or unreadable: treated as a vanished peer). */
export async function readState(store: XenStore, path: string): Promise<number> {
  try {
    const v = await store.readOpt(`${path}/state`);
    return v === undefined ? 0 : Number(v) || 0;
  } catch {
    return 0; // gone or not readable: treat like a vanished peer
  }
}

/** Runs `fn` serially, coalescing triggers that arrive while it runs. */
class Serial {
  private running = false;
  private again = false;
  constructor(private readonly fn: () => Promise<void>, private readonly onError: (e: unknown) => void) {}
  kick(): void {
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = true;
    void (async () => {
      do {
        this.again = false;
        try {
          await this.fn();
        } catch (e) {
          this.onError(e);
        }
      } while (this.again);
      this.running = false;
    })();
  }
}

class Waiters<T> {
  private list: { resolve: (v: T) => void; reject: (e: Error) => void }[] = [];
  wait(timeoutMs: number, what: string): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const t = setTimeout(() => {
        this.list = this.list.filter((w) => w.resolve !== res);
        reject(new VtpmError('ETIMEDOUT', `${what} not reached within ${timeoutMs} ms`));
      }, timeoutMs);
      const res = (v: T): void => {
        clearTimeout(t);
        resolve(v);
      };
      this.list.push({ resolve: res, reject: (e) => (clearTimeout(t), reject(e)) });
    });
  }
  resolve(v: T): void {
    for (const w of this.list.splice(0)) w.resolve(v);
  }
  reject(e: Error): void {
    for (const w of this.list.splice(0)) w.reject(e);
  }
}

export abstract class XenbusDevice<L> {
  state: number;
  link: L | null = null;
  protected closing = false;
  protected readonly serial: Serial;
  protected readonly conn = new Waiters<L>();
  protected readonly closed = new Waiters<void>();
  protected readonly disconnectCbs: (() => void)[] = [];

  /** `ownPath`: this end's directory (its `state` key is ours to write). */
  protected constructor(readonly dom: Domain, protected readonly ownPath: string, initial: number) {
    this.state = initial;
    this.serial = new Serial(() => this.step(), (e) => {
      if (process.env.VTPM_DEBUG) process.stderr.write(`xenbus: ${(e as Error).stack}\n`);
    });
  }

  /** One turn of the handshake, after any change seen by a watch. */
  protected abstract step(): Promise<void>;

  onDisconnect(cb: () => void): void {
    this.disconnectCbs.push(cb);
  }

  connected(timeoutMs = 30_000): Promise<L> {
    if (this.state === S.Connected && this.link) return Promise.resolve(this.link);
    return this.conn.wait(timeoutMs, 'xenbus Connected');
  }

  protected async setState(s: number): Promise<void> {
    this.state = s;
    await this.dom.store.write(`${this.ownPath}/state`, String(s));
  }

  /** Start an orderly close: null when one is under way already; else a promise that
   *  settles once step() resolved `closed`, or after timeoutMs with `release` run and
   *  Closed published (a peer that never answers). */
  protected beginClose(timeoutMs: number, release: () => Promise<void>): Promise<void> | null {
    if (this.closing) return null;
    this.closing = true;
    return this.closed.wait(timeoutMs, 'xenbus Closed').catch(async () => {
      await release();
      await this.setState(S.Closed).catch(() => {});
    });
  }
}
