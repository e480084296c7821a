// The control-channel server: one control connection at a time (swtpm's rule) plus one data
// channel, served from the calling thread with blocking syscalls and poll(2), so a TPM
// command never waits for a JavaScript event-loop turn. Run serveSync() on a worker thread
// (thread.ts does; vtpmd's engine thread can call it directly).
//
//   const server = new CtrlServer({ controller, ctrl: { listenPath }, stopFd })
//   const why = server.serveSync()   // 'shutdown' (CMD_SHUTDOWN) | 'stopped' | 'hangup'
import { describeError } from '../base/errors.ts';
import { POLLERR, POLLIN, POLLNVAL, sysClose, sysPoll } from '../base/libc.ts';
import { sysAccept, sysRecvmsg, unixListen } from '../base/libc-sockets.ts';
import type { Controller } from './controller.ts';
import { DataChannel } from './data-channel.ts';
import { drain, readFull, writeAll } from './io.ts';
import { cmdName, CTRL_FIRST_READ, frameNeed, resultResponse, RES } from './protocol.ts';
import { rmSync } from 'node:fs';

/** Where the control channel comes from: a unix socket to listen on (swtpm --ctrl
 *  type=unixio,path=...), a listening socket already made, or one connected client
 *  (swtpm --ctrl type=unixio,clientfd=...). */
export type CtrlEndpoint = { listenPath: string } | { listenFd: number } | { clientFd: number };
/** swtpm's `--server type=unixio,path=...`: a data channel clients connect to (besides
 *  SET_DATAFD, which takes precedence while its descriptor is connected). */
export type DataEndpoint = { listenPath: string } | { listenFd: number };

export interface CtrlServerOptions {
  controller: Controller;
  ctrl: CtrlEndpoint;
  data?: DataEndpoint;
  /** Readable (a pipe's read end, written by the owner) → serveSync returns 'stopped'. */
  stopFd?: number;
  /** swtpm --terminate: end ('hangup') when the control client or the data client goes. */
  terminateOnHup?: boolean;
  /** How long a started control frame may stall before it is refused (swtpm: 500 ms). */
  frameIdleMs?: number;
  log?: (msg: string) => void;
}

export type ServeEnd = 'shutdown' | 'stopped' | 'hangup';

export class CtrlServer {
  private ctrlListen = -1;
  private ctrlClient = -1;
  private dataListen = -1;
  private data: DataChannel | null = null;
  private readonly owned: string[] = [];
  private frame = new Uint8Array(CTRL_FIRST_READ);
  private readonly log: (msg: string) => void;

  constructor(private readonly o: CtrlServerOptions) {
    this.log = o.log ?? (() => {});
    try {
      if ('listenPath' in o.ctrl) {
        this.ctrlListen = unixListen(o.ctrl.listenPath);
        this.owned.push(o.ctrl.listenPath);
      } else if ('listenFd' in o.ctrl) this.ctrlListen = o.ctrl.listenFd;
      else this.ctrlClient = o.ctrl.clientFd;
      if (o.data && 'listenPath' in o.data) {
        this.dataListen = unixListen(o.data.listenPath);
        this.owned.push(o.data.listenPath);
      } else if (o.data) this.dataListen = o.data.listenFd;
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /** Serve until SHUTDOWN, the stop descriptor, or (terminateOnHup) a hang-up. */
  serveSync(): ServeEnd {
    const fds = [-1, -1, -1, -1, -1];
    const ev = [POLLIN, POLLIN, POLLIN, POLLIN, POLLIN];
    const rev = [0, 0, 0, 0, 0];
    const pfds = Buffer.alloc(8 * fds.length);
    try {
      for (;;) {
        fds[0] = this.o.stopFd ?? -1;
        fds[1] = this.ctrlClient < 0 ? this.ctrlListen : -1;
        fds[2] = this.ctrlClient;
        fds[3] = this.data ? -1 : this.dataListen;
        fds[4] = this.data?.fd ?? -1;
        const n = sysPoll(fds, ev, -1, pfds, rev);
        if (n < 0) continue; // EINTR
        if (rev[0]) return 'stopped';
        if (rev[1] & POLLIN) {
          const c = sysAccept(this.ctrlListen);
          if (c >= 0) this.ctrlClient = c;
        }
        if (rev[2]) {
          const end = this.serveCtrl(rev[2]);
          if (end) return end;
        }
        if (rev[3] & POLLIN) {
          const c = sysAccept(this.dataListen);
          if (c >= 0) this.data = new DataChannel(c, this.o.controller, this.log);
        }
        if (rev[4] && this.data) {
          const r = rev[4] & POLLIN ? this.data.serveOne() : 'eof';
          if (r === 'eof' || r === 'error' || rev[4] & (POLLNVAL | POLLERR)) {
            this.log('data client disconnected');
            this.dropData();
            if (this.o.terminateOnHup) return 'hangup';
          }
        }
      }
    } finally {
      this.close();
    }
  }

  /** The control client is readable or hung up; returns how serving ends, if it does. */
  private serveCtrl(revents: number): ServeEnd | undefined {
    const gone = (): ServeEnd | undefined => {
      sysClose(this.ctrlClient);
      this.ctrlClient = -1;
      return this.o.terminateOnHup ? 'hangup' : undefined;
    };
    if (!(revents & POLLIN)) return gone(); // POLLHUP / POLLERR with nothing left to read
    const fd = this.ctrlClient;
    const got = this.readFrame(fd);
    if (got.kind === 'gone') return gone();
    if (got.kind === 'refuse') {
      for (const f of got.fds) sysClose(f);
      this.log(`control frame refused: ${got.why}`);
      if (!writeAll(fd, resultResponse(got.result))) return gone();
      if (got.drain && drain(fd) !== 'ok') return gone();
      return undefined;
    }
    const ctl = this.o.controller;
    const out = ctl.handle(got.frame, got.fds, this.data !== null);
    for (const f of got.fds) if (f !== out.dataFd) sysClose(f);
    if (out.dataFd !== undefined) {
      this.dropData();
      this.data = new DataChannel(out.dataFd, ctl, this.log);
    }
    if (!writeAll(fd, out.response)) return gone();
    if (out.terminate) return 'shutdown';
    return undefined;
  }

  private readFrame(
    fd: number,
  ): { kind: 'frame'; frame: Uint8Array; fds: number[] } | { kind: 'refuse'; result: number; why: string; drain: boolean; fds: number[] } | { kind: 'gone' } {
    // A big buffer is kept only for the frame (a state blob) that needed it.
    if (this.frame.length > CTRL_FIRST_READ) this.frame = new Uint8Array(CTRL_FIRST_READ);
    // First read as swtpm does: what is there, up to its buffer (descriptors ride on it).
    const first = sysRecvmsg(fd, this.frame, CTRL_FIRST_READ);
    if (first.n <= 0) {
      for (const f of first.fds) sysClose(f);
      return { kind: 'gone' };
    }
    let got = first.n;
    for (;;) {
      const need = frameNeed(this.frame.subarray(0, got));
      if (!need.ok) return { kind: 'refuse', result: need.result, why: need.why, drain: true, fds: first.fds };
      if (got >= need.bytes) return { kind: 'frame', frame: this.frame.subarray(0, got), fds: first.fds };
      if (need.bytes > this.frame.length) {
        const bigger = new Uint8Array(need.bytes);
        bigger.set(this.frame.subarray(0, got));
        this.frame = bigger;
      }
      // Only up to what the frame needs: the next frame's bytes stay in the socket.
      const r = readFull(fd, this.frame, got, need.bytes - got, this.o.frameIdleMs ?? 500);
      if (r === 'eof' || r === 'error') {
        for (const f of first.fds) sysClose(f);
        return { kind: 'gone' };
      }
      if (r === 'timeout') {
        const cmd = got >= 4 ? cmdName(new DataView(this.frame.buffer, this.frame.byteOffset).getUint32(0)) : 'command';
        return { kind: 'refuse', result: RES.BAD_PARAMETER, why: `${cmd} frame stalled after ${got} of ${need.bytes} bytes`, drain: false, fds: first.fds };
      }
      got = need.bytes;
    }
  }

  private dropData(): void {
    if (!this.data) return;
    sysClose(this.data.fd);
    this.data = null;
  }

  /** Close every descriptor this server holds and remove the sockets it made. */
  close(): void {
    this.dropData();
    for (const fd of [this.ctrlClient, this.ctrlListen, this.dataListen]) if (fd >= 0) sysClose(fd);
    this.ctrlClient = this.ctrlListen = this.dataListen = -1;
    for (const p of this.owned.splice(0)) {
      try {
        rmSync(p, { force: true });
      } catch (e) {
        this.log(`cannot remove ${p}: ${describeError(e)}`);
      }
    }
  }
}
