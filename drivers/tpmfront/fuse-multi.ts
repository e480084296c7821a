// One thread serving many FUSE mounts: one epoll on all their /dev/fuse descriptors (opened
// non-blocking) plus an eventfd other threads signal to hand this one work. Each ready
// mount gets one request answered per wake (FuseServer.step: its own tpm-dev core, parked
// OPENs, tpmrm0 spaces); the wait's timeout is the earliest parked OPEN's deadline among
// the mounts that have one, so an idle thread sleeps in epoll_wait with no wake-ups.
// While one mount's request waits for its TPM (a READ collecting vtpmd's response, a
// tpmrm0 command), this thread serves no other: mounts sharing a thread serialize like
// commands on one chip (the pool spreads mounts over its threads: fuse-pool.ts).
import { ERRNO } from '../base/libc.ts';
import { describeError } from '../base/errors.ts';
import { Epoll, type EventFd } from '../base/libc-poll.ts';
import type { FuseServer, ServeEnd } from './fuse-serve.ts';

/** epoll token of the wake eventfd; mounts' ids start at 1. */
const WAKE = 0;

export interface ServedMount {
  id: number;
  fd: number;
  server: FuseServer;
}

export type MultiEnd = ServeEnd | 'failed';

export class MultiServer {
  private readonly ep = new Epoll(64);
  private readonly mounts = new Map<number, ServedMount>();
  /** Mounts with a parked OPEN (the only ones with a deadline). */
  private readonly parked = new Set<ServedMount>();

  constructor(private readonly wake: EventFd) {
    this.ep.add(wake.fd, WAKE);
  }

  get size(): number {
    return this.mounts.size;
  }

  add(m: ServedMount): void {
    if (m.id <= WAKE || this.mounts.has(m.id)) throw new RangeError(`bad mount id ${m.id}`);
    this.ep.add(m.fd, m.id);
    this.mounts.set(m.id, m);
  }

  /** Stop serving mount `id` (its fd stays open: the caller closes it); the mount, if known. */
  remove(id: number): ServedMount | undefined {
    const m = this.mounts.get(id);
    if (!m) return undefined;
    this.ep.del(m.fd);
    this.mounts.delete(id);
    this.parked.delete(m);
    return m;
  }

  ids(): number[] {
    return [...this.mounts.keys()];
  }

  /** Serve until the wake eventfd is signalled. A mount that ends meanwhile (unmounted,
   *  DESTROY, its fd unusable) is removed and handed to `ended` with how and why. */
  serve(ended: (m: ServedMount, how: MultiEnd, why?: string) => void): void {
    for (;;) {
      let timeout = Infinity;
      for (const m of this.parked) {
        const left = m.server.expireParked();
        if (left === Infinity) this.parked.delete(m);
        else timeout = Math.min(timeout, left);
      }
      const n = this.ep.wait(timeout);
      if (n < 0) {
        if (n === -ERRNO.EINTR) continue;
        throw new Error(`epoll_wait failed: errno ${-n}`);
      }
      let woken = false;
      for (let i = 0; i < n; i++) {
        const token = this.ep.token(i);
        if (token === WAKE) {
          woken = true;
          continue;
        }
        const m = this.mounts.get(token);
        if (m) this.stepOne(m, ended);
      }
      if (woken) {
        this.wake.drain();
        return;
      }
    }
  }

  private stepOne(m: ServedMount, ended: (m: ServedMount, how: MultiEnd, why?: string) => void): void {
    let end: MultiEnd | null;
    let why: string | undefined;
    try {
      end = m.server.step();
      if (end && m.server.writeError) why = m.server.writeError.message;
    } catch (e) {
      // This mount's fd failed: it ends, the others go on.
      end = 'failed';
      why = describeError(e);
    }
    if (end) {
      this.remove(m.id);
      ended(m, end, why);
    } else if (m.server.parkedOpens > 0) this.parked.add(m);
  }

  close(): void {
    this.ep.close();
  }
}
