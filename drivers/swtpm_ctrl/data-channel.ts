// The data channel: TPM commands as a byte stream, each framed by its own header's size
// field (what QEMU writes on the socketpair it hands over with SET_DATAFD, and what a
// `--server` client writes). A TPM 2.0 command may come behind swtpm's TCG command header
// (u32 TPM2_SEND_COMMAND = 8, u8 locality, u32 size); its response then goes out behind a
// u32 size and is followed by a u32 0 acknowledgement (PTM_CAP_SEND_COMMAND_HEADER).
import { TPM_HEADER_SIZE, errorResponse, TPM_ST_NO_SESSIONS, TPM_TAG_RSP_COMMAND } from '../tpm/command.ts';
import { Reader, Writer } from '../tpm/marshal.ts';
import { TPM_BAD_PARAM_SIZE, TPM_RC_COMMAND_SIZE } from '../tpm/rc.ts';
import type { Controller } from './controller.ts';
import { drain, readFull, writeAll, type ReadResult } from './io.ts';
import { TPM_BUFFER_MAX } from './protocol.ts';

const TPM2_SEND_COMMAND = 8;
const PREFIX = 9; // u32 cmd, u8 locality, u32 size
const TPM2_TAGS = new Set([0x8001, 0x8002]);

/** How long a command may take to arrive once its first bytes are in. */
const IDLE_MS = 2000;

export type DataResult = 'ok' | Exclude<ReadResult, 'ok'>;

export class DataChannel {
  private readonly buf = new Uint8Array(PREFIX + TPM_BUFFER_MAX + 16);

  constructor(
    readonly fd: number,
    private readonly ctl: Controller,
    private readonly log: (msg: string) => void,
  ) {}

  /** Serve one command (call when fd is readable). 'eof'/'error': the peer is gone. */
  serveOne(): DataResult {
    const b = this.buf;
    const r = readFull(this.fd, b, 0, TPM_HEADER_SIZE, IDLE_MS);
    if (r !== 'ok') return r === 'timeout' ? this.tooShort() : r;
    const head = new Reader(b, 0, TPM_HEADER_SIZE);
    const tag = head.u16();
    const v2 = this.ctl.version === '2.0';
    const prefixed = v2 && !TPM2_TAGS.has(tag) && new Reader(b, 0, 4).u32() === TPM2_SEND_COMMAND;
    let start = 0;
    let total: number;
    let locality = this.ctl.locality;
    if (prefixed) {
      const p = new Reader(b, 4, PREFIX);
      locality = p.u8();
      const size = p.u32();
      if (size < TPM_HEADER_SIZE || size > this.ctl.bufferSize) return this.badSize(size);
      start = PREFIX;
      total = PREFIX + size;
      this.ctl.locality = locality; // swtpm keeps the header's locality for later commands
    } else {
      total = new Reader(b, 2, 6).u32();
      if (total < TPM_HEADER_SIZE || total > this.ctl.bufferSize) return this.badSize(total);
    }
    if (total > TPM_HEADER_SIZE) {
      const rest = readFull(this.fd, b, TPM_HEADER_SIZE, total - TPM_HEADER_SIZE, IDLE_MS);
      if (rest === 'timeout') return this.tooShort();
      if (rest !== 'ok') return rest;
    }
    const resp = this.ctl.processTpm(b.subarray(start, total), locality);
    const sent = prefixed
      ? writeAll(this.fd, new Writer(resp.length + 8).u32(resp.length).bytes(resp).u32(0).finish())
      : writeAll(this.fd, resp);
    return sent ? 'ok' : 'error';
  }

  /** A size field the TPM cannot take: a size error response, and the rest of the stream
   *  dropped (it cannot be framed any more). The peer stays connected. */
  private badSize(size: number): DataResult {
    this.log(`data channel: command size ${size} outside ${TPM_HEADER_SIZE}..${this.ctl.bufferSize}`);
    const v2 = this.ctl.version === '2.0';
    const resp = errorResponse(v2 ? TPM_ST_NO_SESSIONS : TPM_TAG_RSP_COMMAND, v2 ? TPM_RC_COMMAND_SIZE : TPM_BAD_PARAM_SIZE);
    if (!writeAll(this.fd, resp)) return 'error';
    const d = drain(this.fd);
    return d === 'ok' || d === 'timeout' ? 'ok' : d;
  }

  private tooShort(): DataResult {
    this.log('data channel: a command stalled before it was complete');
    const v2 = this.ctl.version === '2.0';
    const resp = errorResponse(v2 ? TPM_ST_NO_SESSIONS : TPM_TAG_RSP_COMMAND, v2 ? TPM_RC_COMMAND_SIZE : TPM_BAD_PARAM_SIZE);
    return writeAll(this.fd, resp) ? 'ok' : 'error';
  }
}
