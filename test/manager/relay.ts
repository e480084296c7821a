// The untrusted network between two test hosts: a TCP relay in the test's namespace that
// passes bytes between a source host and a destination host, and on request flips a byte,
// cuts a connection at a byte offset, holds a direction, or records what the source sent.
import * as net from 'node:net';
import type { Test } from 'tap';

export interface Plan {
  /** Flip this byte (offset in what the source sends). */
  flipAt?: number;
  /** Close both sides once this many of the source's bytes have passed. */
  cutAt?: number;
  /** Pass the destination's first frame (its hello), then close both sides when it sends
   *  more (the ack never reaches the source). */
  cutAfterHello?: boolean;
  /** Pass this many of the source's bytes, then hold the rest until release() (or the end). */
  holdAt?: number;
  /** After this connection, drop every new one until allow(). */
  thenRefuse?: boolean;
}

export interface Relay {
  /** Where the source connects. */
  readonly address: string;
  /** The plan for the next connection (later ones pass everything). */
  plan(p: Plan): void;
  /** Everything the source sent on each connection so far. */
  readonly recorded: Buffer[];
  /** Resolves once a connection holds at holdAt. */
  held(): Promise<void>;
  /** Close the held connection. */
  cutHeld(): void;
  /** Connections accepted so far. */
  readonly connections: number;
  /** Pass new connections again (after a plan's thenRefuse). */
  allow(): void;
}

export async function startRelay(t: Test, listen: { host: string; port: number }, target: { host: string; port: number }): Promise<Relay> {
  let next: Plan = {};
  const recorded: Buffer[] = [];
  let heldSock: (() => void) | null = null;
  let heldWaiters: (() => void)[] = [];
  let connections = 0;
  let refusing = false;
  const server = net.createServer((src) => {
    connections++;
    if (refusing) return void src.destroy();
    const plan = next;
    next = {};
    if (plan.thenRefuse) refusing = true;
    const rec: Buffer[] = [];
    recorded.push(Buffer.alloc(0));
    const slot = recorded.length - 1;
    const dst = net.connect(target);
    const end = () => {
      src.destroy();
      dst.destroy();
    };
    src.on('error', end);
    dst.on('error', end);
    // One side closing passes on as a close once what it sent has been written: destroying
    // the other side at once dropped the last frame in flight (a destination's abort).
    src.on('close', () => dst.end());
    dst.on('close', () => src.end());
    let sent = 0;
    let replied = 0;
    let holding = false;
    src.on('data', (chunk: Buffer) => {
      let c = Buffer.from(chunk);
      rec.push(Buffer.from(chunk));
      recorded[slot] = Buffer.concat(rec);
      if (holding) return;
      if (plan.flipAt !== undefined && plan.flipAt >= sent && plan.flipAt < sent + c.length) c[plan.flipAt - sent] ^= 0x01;
      if (plan.holdAt !== undefined && sent + c.length > plan.holdAt) {
        dst.write(c.subarray(0, plan.holdAt - sent));
        holding = true;
        heldSock = end;
        for (const w of heldWaiters.splice(0)) w();
        return;
      }
      if (plan.cutAt !== undefined && sent + c.length >= plan.cutAt) {
        dst.write(c.subarray(0, plan.cutAt - sent), () => end());
        return;
      }
      sent += c.length;
      dst.write(c);
    });
    let helloBytes = -1;
    dst.on('data', (chunk: Buffer) => {
      if (plan.cutAfterHello && helloBytes < 0 && replied === 0 && chunk.length >= 4) helloBytes = 4 + chunk.readUInt32BE(0);
      if (plan.cutAfterHello && helloBytes >= 0 && replied + chunk.length > helloBytes) {
        src.write(chunk.subarray(0, Math.max(0, helloBytes - replied)), () => end());
        replied = helloBytes;
        return;
      }
      replied += chunk.length;
      src.write(chunk);
    });
  });
  await new Promise<void>((r) => server.listen(listen.port, listen.host, () => r()));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  return {
    address: `${listen.host}:${listen.port}`,
    plan: (p) => (next = p),
    recorded,
    held: () => (heldSock ? Promise.resolve() : new Promise<void>((r) => heldWaiters.push(r))),
    cutHeld: () => {
      heldSock?.();
      heldSock = null;
      heldWaiters = [];
    },
    get connections() {
      return connections;
    },
    allow: () => (refusing = false),
  };
}
