// The Engine seam: a TPM that runs in this process (libtpms), synchronous because the
// library is. Whoever serves I/O runs an Engine on its own thread (a worker), never on
// a JavaScript thread that serves other requests.

export type TpmVersion = '1.2' | '2.0';
export type StateBlobType = 'permanent' | 'volatile' | 'savestate';

/** Where an engine's NVRAM blobs live (libtpms' nvram callbacks land here).
 *  Synchronous, because libtpms calls back synchronously from inside a command. */
export interface StateStore {
  /** The blob stored under `name`, or undefined when there is none yet. */
  load(name: string): Uint8Array | undefined;
  store(name: string, data: Uint8Array): void;
  delete(name: string): void;
}

export interface Engine {
  readonly version: TpmVersion;
  /** Run one command; always returns a response (TPM errors are responses). */
  process(command: Uint8Array, locality?: number): Uint8Array;
  /** process() into the caller's buffer (no allocation per command); returns the length. */
  processInto?(command: Uint8Array, out: Uint8Array, locality?: number): number;
  /** Ask the TPM to abandon the command in flight (callable from another thread's view). */
  cancel(): void;
  /** A state blob as libtpms serialises it, or undefined when there is none. */
  getState(type: StateBlobType): Uint8Array | undefined;
  /** Give a state blob back; only before the engine is (re)started. */
  setState(type: StateBlobType, blob: Uint8Array): void;
  /** Stop the TPM and release libtpms so it can be initialised again. */
  terminate(): void;
  /** libtpms' JSON description of itself (TPMLIB_GetInfo). */
  info(): unknown;
}

/** In-memory store: tests and engines whose owner persists blobs itself. */
export class MemoryStateStore implements StateStore {
  readonly blobs = new Map<string, Uint8Array>();
  load(name: string): Uint8Array | undefined {
    return this.blobs.get(name);
  }
  store(name: string, data: Uint8Array): void {
    this.blobs.set(name, data.slice());
  }
  delete(name: string): void {
    this.blobs.delete(name);
  }
}
