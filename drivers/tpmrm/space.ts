// One tpmrm0 open file's handle space (the kernel's struct tpm_space): which of its transient
// objects and sessions exist, and their saved contexts. Between commands nothing of a space
// is loaded in the TPM: objects are saved and flushed, sessions saved (a saved session keeps
// its handle, so sessions are not virtualised).
//   objects[i]   0: free slot; SAVED: its context is in objectBuf; else the TPM handle it
//                is loaded at (only while a command runs). Slot i is virtual handle
//                0x80ffffff - i.
//   sessions[i]  0: free; else the session's handle (its context in sessionBuf).
// Saved contexts are packed in slot order, as the kernel packs them.
import { SPACE_BUFFER_SIZE, SPACE_OBJECTS, SPACE_SESSIONS } from './constants.ts';

export class ContextTable {
  readonly objects = new Uint32Array(SPACE_OBJECTS);
  readonly sessions = new Uint32Array(SPACE_SESSIONS);
  /** Saved contexts, and how many bytes of each buffer are in use. */
  readonly objectBuf: Uint8Array;
  readonly sessionBuf: Uint8Array;
  objectBytes = 0;
  sessionBytes = 0;

  constructor(bufferSize = SPACE_BUFFER_SIZE) {
    this.objectBuf = new Uint8Array(bufferSize);
    this.sessionBuf = new Uint8Array(bufferSize);
  }

  /** Take `from`'s tables and saved contexts (only the bytes in use are copied). */
  copyFrom(from: ContextTable): void {
    this.objects.set(from.objects);
    this.sessions.set(from.sessions);
    this.objectBuf.set(from.objectBuf.subarray(0, from.objectBytes));
    this.sessionBuf.set(from.sessionBuf.subarray(0, from.sessionBytes));
    this.objectBytes = from.objectBytes;
    this.sessionBytes = from.sessionBytes;
  }

  /** True when the space holds nothing (no object, no session): commands need no loads. */
  get empty(): boolean {
    for (const h of this.objects) if (h !== 0) return false;
    for (const h of this.sessions) if (h !== 0) return false;
    return true;
  }
}

/** A space as the front end holds it: one per tpmrm0 open file. */
export class Space {
  readonly table = new ContextTable();
  closed = false;
  constructor(readonly id: number) {}
}
