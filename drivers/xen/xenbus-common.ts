// What both xenbus sides share: states, the device paths, the toolstack's retarget, and
// two small async helpers. The sides are xenbus-front.ts and xenbus-back.ts (see xenbus.ts).
import { VtpmError } from '../tpm/errors.ts';
import type { XenStore } from './xenstore.ts';

export const XenbusState = { Unknown: 0, Initialising: 1, InitWait: 2, Initialised: 3, Connected: 4, Closing: 5, Closed: 6 } as const;
export const S = XenbusState;

export function frontPath(frontId: number, devid: number): string {
  return `/local/domain/${frontId}/device/vtpm/${devid}`;
}
export function backPath(backId: number, frontId: number, devid: number): string {
  return `/local/domain/${backId}/backend/vtpm/${frontId}/${devid}`;
}

/** Domain-0 toolstack: point a front's device at another back end domain. */
export async function retargetFront(store0: XenStore, frontId: number, devid: number, backId: number): Promise<void> {
  const f = frontPath(frontId, devid);
  await store0.transaction(async (tx) => {
    tx.write(`${f}/backend`, backPath(backId, frontId, devid));
    tx.write(`${f}/backend-id`, String(backId));
  });
}

export async function readState(store: XenStore, path: string): Promise<number> {
  try {
    const v = await store.readOpt(`${path}/state`);
    return v === undefined ? 0 : Number(v) || 0;
  } catch {
    return 0; // gone or not readable: treat like a vanished peer
  }
}

/** Runs `fn` serially, coalescing triggers that arrive while it runs. */
export class Serial {
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

export class Waiters<T> {
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
