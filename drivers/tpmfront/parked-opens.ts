// OPENs of tpm0 waiting for the node to be free (the kernel may still be delivering the
// previous opener's RELEASE), oldest first, each with the deadline after which it gets
// EBUSY. The FUSE loop answers them out of order by their request's `unique`.

export interface ParkedOpen {
  /** The request's unique, its raw 8 bytes. */
  unique: Uint8Array;
  deadline: number;
}

export class ParkedOpens {
  private readonly queue: ParkedOpen[] = [];

  get length(): number {
    return this.queue.length;
  }

  /** Park the OPEN whose unique is `unique` (copied) for `graceMs`. */
  park(unique: Uint8Array, graceMs: number): void {
    this.queue.push({ unique: unique.slice(), deadline: performance.now() + graceMs });
  }

  /** Ms until the oldest deadline (≤ 0: it has passed); only while one is parked. */
  leftMs(): number {
    return this.queue[0]!.deadline - performance.now();
  }

  /** The oldest parked OPEN, taken off the queue. */
  shift(): ParkedOpen | undefined {
    return this.queue.shift();
  }

  /** The parked OPEN whose unique is the 8 bytes of `buf` at `at` (an INTERRUPT's target), taken off. */
  take(buf: Uint8Array, at: number): ParkedOpen | undefined {
    const i = this.queue.findIndex((p) => {
      for (let k = 0; k < 8; k++) if (p.unique[k] !== buf[at + k]) return false;
      return true;
    });
    return i >= 0 ? this.queue.splice(i, 1)[0] : undefined;
  }
}
