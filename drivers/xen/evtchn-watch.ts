// Peer death without timers: one pidfd per peer process (pidfd_open(2)), all of them in one
// poll(2) that runs on koffi's async worker while the event loop sleeps. When a peer exits
// its pidfd turns readable and the callbacks registered for it run on the event loop (the
// domain closes that peer's channels, which wakes every waiter on them in any thread).
// Nothing runs while no peer dies: no slices, no /proc reads. An eventfd re-arms the poll
// when the set of watched peers changes. With nothing watched no poll is outstanding, so
// the watch never keeps a process alive on its own.
//
//   const off = peerWatch.watch(pid, start, () => ...)   // start: procStartTime(pid)
//   off()                                                // no longer interested
//
// The start time guards against pid reuse: a pid whose process has another start time (or
// is already gone) calls back at once (on the next event-loop turn).
import { VtpmError } from '../base/errors.ts';
import { POLLIN, processAlive, sysClose, sysRead, sysWrite } from '../base/libc.ts';
import { eventFd, pidfdOpen, pollAsync } from '../base/libc-wait.ts';

interface Peer {
  key: string;
  fd: number;
  callbacks: Set<() => void>;
}

const MAX_PEERS = 4096;
const ONE = new Uint8Array([1, 0, 0, 0, 0, 0, 0, 0]);

class PeerWatch {
  private readonly peers = new Map<string, Peer>(); // "pid:start"
  private efd = -1;
  private polling = false;
  private pfds = Buffer.alloc(8 * 16);
  private polled: Peer[] = []; // entry i + 1 of pfds
  private closing: number[] = []; // pidfds unwatched while a poll may still hold them
  private readonly drain = new Uint8Array(8);

  watch(pid: number, start: number, onDeath: () => void): () => void {
    if (!Number.isInteger(pid) || pid <= 0) throw new VtpmError('EINVAL', `bad peer pid ${pid}`);
    const key = `${pid}:${start}`;
    let p = this.peers.get(key);
    if (!p) {
      if (this.peers.size >= MAX_PEERS) throw new VtpmError('EBUSY', `more than ${MAX_PEERS} peer processes watched`);
      const fd = pidfdOpen(pid);
      // opened, then checked: the fd pins the process we checked, not a later one with its pid
      if (fd < 0 || !processAlive(pid, start)) {
        if (fd >= 0) sysClose(fd);
        setImmediate(onDeath);
        return () => {};
      }
      p = { key, fd, callbacks: new Set() };
      this.peers.set(key, p);
      this.changed();
    }
    const cb = (): void => onDeath();
    p.callbacks.add(cb);
    const peer = p;
    return () => {
      if (!peer.callbacks.delete(cb) || peer.callbacks.size > 0 || this.peers.get(key) !== peer) return;
      this.peers.delete(key);
      // a poll running on another thread may hold this fd: closing it now could let its
      // number be reused (and reported) before that poll returns
      if (this.polling) this.closing.push(peer.fd);
      else sysClose(peer.fd);
      this.changed();
    };
  }

  /** Watched peers (for tests and status). */
  get size(): number {
    return this.peers.size;
  }

  /** The set changed: start the poll, or make the running one return (it re-arms). */
  private changed(): void {
    if (this.efd < 0) {
      this.efd = eventFd();
      // process.exit joins libuv's threads: the poll blocking one of them must return first
      process.once('exit', () => {
        this.peers.clear();
        if (this.polling) sysWrite(this.efd, ONE, 8);
      });
    }
    if (this.polling) sysWrite(this.efd, ONE, 8);
    else if (this.peers.size > 0) this.arm();
  }

  private arm(): void {
    this.polled = [...this.peers.values()];
    const n = this.polled.length + 1;
    if (this.pfds.length < 8 * n) this.pfds = Buffer.alloc(16 * n);
    for (let i = 0; i < n; i++) {
      this.pfds.writeInt32LE(i === 0 ? this.efd : this.polled[i - 1]!.fd, 8 * i);
      this.pfds.writeInt16LE(POLLIN, 8 * i + 4);
      this.pfds.writeInt16LE(0, 8 * i + 6);
    }
    this.polling = true;
    pollAsync(this.pfds, n, () => this.returned());
  }

  private returned(): void {
    this.polling = false;
    sysRead(this.efd, this.drain, 8); // non-blocking: clears a pending re-arm request
    for (const fd of this.closing) sysClose(fd);
    this.closing = [];
    const dead: Peer[] = [];
    for (let i = 0; i < this.polled.length; i++) {
      const p = this.polled[i]!;
      if (this.pfds.readInt16LE(8 * (i + 1) + 6) === 0 || this.peers.get(p.key) !== p) continue;
      this.peers.delete(p.key);
      sysClose(p.fd);
      dead.push(p);
    }
    this.polled = [];
    if (this.peers.size > 0) this.arm();
    for (const p of dead) for (const cb of p.callbacks) cb();
  }
}

/** The process's one watch (used from the thread that owns the Domain objects). */
export const peerWatch = new PeerWatch();
