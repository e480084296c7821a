// The TPM's own command table (TPM_CAP_COMMANDS: one TPMA_CC per implemented command), which
// tells the resource manager how many handles each command carries and whether its
// response starts with a new handle. Linux reads it once at chip start-up
// (tpm2_get_cc_attrs_tbl in tpm2-cmd.c); so do we, from whatever TPM is behind the node.
import { VtpmError } from '../base/errors.ts';
import { parseHeader, TPM_HEADER_SIZE, TPM_ST_NO_SESSIONS } from '../tpm/command.ts';
import { Reader } from '../tpm/marshal.ts';
import * as tpm2 from '../tpm/tpm2.ts';
import {
  CC_CHANDLES_MASK,
  CC_CHANDLES_SHIFT,
  CC_INDEX_MASK,
  CC_RHANDLE_BIT,
  TPM_CAP_COMMANDS,
  TPM_CC_CONTEXT_SAVE,
  TPM_CC_FIRST,
  TPM_CC_FLUSH_CONTEXT,
} from './constants.ts';

/** Runs one command on the TPM (the resource manager's path to it) and returns the response. */
export type RunCommand = (cmd: Uint8Array) => Uint8Array;

/** How many commands a TPM may list: the kernel refuses more than 0xFFFFF; a real TPM has ~120. */
const MAX_COMMANDS = 1024;

export class CommandAttributes {
  /** TPMA_CC by command index (the low 16 bits of the command code). */
  private readonly byIndex = new Map<number, number>();

  get size(): number {
    return this.byIndex.size;
  }

  /** TPMA_CC of a command code, or -1 when the TPM does not implement it. As the kernel's
   *  tpm2_find_cc, the whole code must equal the index: a vendor code (V bit) never matches. */
  lookup(cc: number): number {
    if (cc > CC_INDEX_MASK) return -1;
    return this.byIndex.get(cc) ?? -1;
  }

  static handles(attrs: number): number {
    return (attrs >>> CC_CHANDLES_SHIFT) & CC_CHANDLES_MASK;
  }

  static returnsHandle(attrs: number): boolean {
    return (attrs & CC_RHANDLE_BIT) !== 0;
  }

  /** Replace the table with the TPM's (GetCapability(TPM_CAP_COMMANDS) until moreData is
   *  clear). Returns the response code that stopped it: 0 when the table is complete, a TPM
   *  error (e.g. TPM_RC_INITIALIZE before Startup) leaves the table empty. Throws VtpmError
   *  for a response that is not a TPM 2.0 one or is malformed. */
  load(run: RunCommand): number {
    this.byIndex.clear();
    let next = TPM_CC_FIRST;
    for (;;) {
      const rsp = run(tpm2.getCapability(TPM_CAP_COMMANDS, next, MAX_COMMANDS));
      const h = parseHeader(rsp, 'GetCapability(COMMANDS) response');
      if (h.tag !== TPM_ST_NO_SESSIONS) throw new VtpmError('EPROTO', `GetCapability(COMMANDS) answered with tag 0x${h.tag.toString(16)}: not a TPM 2.0`);
      if (h.code !== 0) {
        this.byIndex.clear();
        return h.code;
      }
      const r = new Reader(rsp, TPM_HEADER_SIZE);
      const more = r.u8('moreData') !== 0;
      if (r.u32('capability') !== TPM_CAP_COMMANDS) throw new VtpmError('EPROTO', 'GetCapability(COMMANDS) answered another capability');
      const count = r.u32('count');
      if (count > MAX_COMMANDS || this.byIndex.size + count > MAX_COMMANDS) throw new VtpmError('EOVERSIZE', `TPM lists more than ${MAX_COMMANDS} commands`);
      let last = -1;
      for (let i = 0; i < count; i++) {
        let attrs = r.u32('TPMA_CC');
        const index = attrs & CC_INDEX_MASK;
        // ContextSave and FlushContext name their object as a parameter, not in the handle
        // area; the kernel counts it as one handle so it is translated like any other.
        if (index === TPM_CC_CONTEXT_SAVE || index === TPM_CC_FLUSH_CONTEXT) {
          attrs = (attrs & ~(CC_CHANDLES_MASK << CC_CHANDLES_SHIFT)) | (1 << CC_CHANDLES_SHIFT);
        }
        this.byIndex.set(index, attrs >>> 0);
        last = index;
      }
      if (!more || count === 0) return 0;
      next = last + 1;
    }
  }
}
