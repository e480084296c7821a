// koffi binding of libtpms (Debian libtpms0 0.9.x). Only this file knows C signatures.
//
// libtpms keeps its TPM in process-global variables: every dlopen of the same file shares
// them, so one loaded copy serves exactly one vTPM. A process (or worker thread) that
// needs a second engine loads a private copy of the .so (a different inode gets its own
// globals); `loadLibtpms({ privateCopy: true })` does that.
import koffi from 'koffi';
import { copyFileSync, mkdtempSync, openSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VtpmError } from '../base/errors.ts';

export const DEFAULT_LIBTPMS = '/usr/lib/x86_64-linux-gnu/libtpms.so.0';

export const TPMLIB_TPM_VERSION_1_2 = 0;
export const TPMLIB_TPM_VERSION_2 = 1;
export const TPMLIB_STATE_PERMANENT = 1;
export const TPMLIB_STATE_VOLATILE = 2;
export const TPMLIB_STATE_SAVE_STATE = 4;
export const TPMLIB_INFO_ALL = 1 | 2 | 4;
export const TPM_SUCCESS = 0;
export const TPM_FAIL = 9;
export const TPM_RETRY = 0x800;

// Callback prototypes: pointers travel as BigInt addresses; we read/write them ourselves.
const NvramInit = koffi.proto('uint32_t vtpm_nvram_init(void)');
const NvramLoad = koffi.proto('uint32_t vtpm_nvram_load(void *data, void *length, uint32_t tpm_number, const char *name)');
const NvramStore = koffi.proto('uint32_t vtpm_nvram_store(void *data, uint32_t length, uint32_t tpm_number, const char *name)');
const NvramDelete = koffi.proto('uint32_t vtpm_nvram_delete(uint32_t tpm_number, const char *name, uint8_t mustExist)');
const IoInit = koffi.proto('uint32_t vtpm_io_init(void)');
const IoLocality = koffi.proto('uint32_t vtpm_io_locality(void *locality, uint32_t tpm_number)');
const IoPresence = koffi.proto('uint32_t vtpm_io_presence(void *presence, uint32_t tpm_number)');

const Callbacks = koffi.struct('vtpm_libtpms_callbacks', {
  sizeOfStruct: 'int',
  tpm_nvram_init: koffi.pointer(NvramInit),
  tpm_nvram_loaddata: koffi.pointer(NvramLoad),
  tpm_nvram_storedata: koffi.pointer(NvramStore),
  tpm_nvram_deletename: koffi.pointer(NvramDelete),
  tpm_io_init: koffi.pointer(IoInit),
  tpm_io_getlocality: koffi.pointer(IoLocality),
  tpm_io_getphysicalpresence: koffi.pointer(IoPresence),
});

export interface LibtpmsCallbacks {
  nvramLoad(name: string): Uint8Array | undefined;
  nvramStore(name: string, data: Uint8Array): void;
  nvramDelete(name: string, mustExist: boolean): boolean;
  locality(): number;
}

export interface Libtpms {
  readonly path: string;
  /** The loaded file's identity (device and inode): one engine per file per process. */
  readonly fileId: string;
  chooseVersion(v: number): number;
  mainInit(): number;
  terminate(): void;
  /** TPMLIB_Process with caller-held slots: see engine.ts for the buffer reuse. */
  process(slots: bigint, cmd: Uint8Array, len: number): number;
  cancel(): number;
  getState(type: number, slots: bigint): number;
  setState(type: number, blob: Uint8Array): number;
  getInfo(flags: number): string;
  setBufferSize(wanted: number): { current: number; min: number; max: number };
  malloc(size: number): bigint;
  free(ptr: bigint): void;
  registerCallbacks(cb: LibtpmsCallbacks): void;
  /** Unregister callbacks and remove a private copy of the library file. */
  dispose(): void;
}

let devNullFd = -1;
function devNull(): number {
  if (devNullFd < 0) devNullFd = openSync('/dev/null', 'w');
  return devNullFd;
}

export function loadLibtpms(opts: { path?: string; privateCopy?: boolean } = {}): Libtpms {
  let path = opts.path ?? DEFAULT_LIBTPMS;
  let copyDir: string | undefined;
  try {
    statSync(path);
  } catch (e) {
    throw new VtpmError('ENOENT', `libtpms not found at ${path} (install libtpms0)`, { cause: e });
  }
  if (opts.privateCopy) {
    copyDir = mkdtempSync(join(tmpdir(), 'vtpm-libtpms-'));
    const copy = join(copyDir, 'libtpms.so');
    copyFileSync(path, copy);
    path = copy;
  }
  let lib: ReturnType<typeof koffi.load>;
  let fileId: string;
  try {
    const st = statSync(path);
    fileId = `${st.dev}_${st.ino}`;
    lib = koffi.load(path);
  } catch (e) {
    if (copyDir) rmSync(copyDir, { recursive: true, force: true });
    throw new VtpmError('ELIBTPMS', `cannot load libtpms from ${path}`, { cause: e });
  }
  // The mapping keeps a private copy alive: its file goes at once, so a process killed
  // with SIGKILL leaves no copy behind (a grouped vtpmd loads one per engine).
  if (copyDir) rmSync(copyDir, { recursive: true, force: true });
  const f = {
    choose: lib.func('uint32_t TPMLIB_ChooseTPMVersion(int ver)'),
    mainInit: lib.func('uint32_t TPMLIB_MainInit(void)'),
    terminate: lib.func('void TPMLIB_Terminate(void)'),
    process: lib.func('uint32_t TPMLIB_Process(void *respbuf, void *respsize, void *respbufsize, const uint8_t *cmd, uint32_t cmdsize)'),
    cancel: lib.func('uint32_t TPMLIB_CancelCommand(void)'),
    getState: lib.func('uint32_t TPMLIB_GetState(int st, void *buffer, void *buflen)'),
    setState: lib.func('uint32_t TPMLIB_SetState(int st, const uint8_t *buffer, uint32_t buflen)'),
    getInfo: lib.func('void *TPMLIB_GetInfo(int flags)'),
    setBufferSize: lib.func('uint32_t TPMLIB_SetBufferSize(uint32_t wanted, _Out_ uint32_t *min, _Out_ uint32_t *max)'),
    register: lib.func('uint32_t TPMLIB_RegisterCallbacks(vtpm_libtpms_callbacks *cbs)'),
    setDebugFD: lib.func('void TPMLIB_SetDebugFD(int fd)'),
    malloc: lib.func('uint32_t TPM_Malloc(void *bufptr, uint32_t size)'),
    free: lib.func('void TPM_Free(void *buf)'),
  };
  // libc's free for the string TPMLIB_GetInfo returns (allocated with malloc).
  const libc = koffi.load('libc.so.6');
  const cfree = libc.func('void free(void *p)');
  const slot = koffi.alloc('uint64_t', 1) as bigint;
  let registered: bigint[] = [];

  // libtpms writes its diagnostics to stderr, and on entering failure mode a hex dump of
  // the command that caused it (NV data, keys' sensitive parts...): never into a log. What
  // went wrong reaches the log as our own errors (the engine's store failure and its cause).
  f.setDebugFD(devNull());
  const api: Libtpms = {
    path,
    fileId,
    chooseVersion: (v) => f.choose(v) as number,
    mainInit: () => f.mainInit() as number,
    terminate: () => void f.terminate(),
    process: (slots, cmd, len) => f.process(slots, slots + 8n, slots + 12n, cmd, len) as number,
    cancel: () => f.cancel() as number,
    getState: (type, slots) => f.getState(type, slots, slots + 8n) as number,
    setState: (type, blob) => f.setState(type, blob, blob.length) as number,
    getInfo(flags) {
      const p = f.getInfo(flags) as bigint | null;
      if (!p) return '';
      const s = koffi.decode(p, 'char', -1) as string;
      cfree(p);
      return s;
    },
    setBufferSize(wanted) {
      const min = [0];
      const max = [0];
      const current = f.setBufferSize(wanted, min, max) as number;
      return { current, min: min[0]!, max: max[0]! };
    },
    malloc(size) {
      const rc = f.malloc(slot, size) as number;
      if (rc !== TPM_SUCCESS) throw new VtpmError('ELIBTPMS', `TPM_Malloc(${size}) failed with ${rc}`);
      return BigInt(koffi.decode(slot, 'uint64_t') as number | bigint);
    },
    free: (ptr) => void f.free(ptr),
    registerCallbacks(cb) {
      for (const r of registered) koffi.unregister(r);
      // koffi turns a JS exception into a 0 (success) return: every callback catches
      // everything and answers TPM_FAIL instead.
      const guard = <A extends unknown[]>(fn: (...a: A) => number) => (...a: A): number => {
        try {
          return fn(...a);
        } catch {
          return TPM_FAIL;
        }
      };
      const load = koffi.register(
        guard((data: bigint, length: bigint, _n: number, name: string) => {
          const blob = cb.nvramLoad(name);
          if (!blob) return TPM_RETRY; // libtpms: no blob yet, not an error
          const p = api.malloc(Math.max(blob.length, 1));
          new Uint8Array(koffi.view(p, blob.length)).set(blob);
          koffi.encode(data, 'uint64_t', p);
          koffi.encode(length, 'uint32_t', blob.length);
          return TPM_SUCCESS;
        }),
        koffi.pointer(NvramLoad),
      );
      const store = koffi.register(
        guard((data: bigint, length: number, _n: number, name: string) => {
          cb.nvramStore(name, new Uint8Array(koffi.view(data, length)).slice());
          return TPM_SUCCESS;
        }),
        koffi.pointer(NvramStore),
      );
      const del = koffi.register(
        guard((_n: number, name: string, mustExist: number) => (cb.nvramDelete(name, mustExist !== 0) ? TPM_SUCCESS : TPM_RETRY)),
        koffi.pointer(NvramDelete),
      );
      const ok = () => TPM_SUCCESS;
      const init = koffi.register(ok, koffi.pointer(NvramInit));
      const ioInit = koffi.register(ok, koffi.pointer(IoInit));
      const loc = koffi.register(
        guard((p: bigint) => {
          koffi.encode(p, 'uint32_t', cb.locality());
          return TPM_SUCCESS;
        }),
        koffi.pointer(IoLocality),
      );
      const pres = koffi.register(
        guard((p: bigint) => {
          koffi.encode(p, 'uint8_t', 0); // no physical presence asserted by a guest
          return TPM_SUCCESS;
        }),
        koffi.pointer(IoPresence),
      );
      registered = [load, store, del, init, ioInit, loc, pres];
      const rc = f.register({
        sizeOfStruct: koffi.sizeof(Callbacks),
        tpm_nvram_init: init,
        tpm_nvram_loaddata: load,
        tpm_nvram_storedata: store,
        tpm_nvram_deletename: del,
        tpm_io_init: ioInit,
        tpm_io_getlocality: loc,
        tpm_io_getphysicalpresence: pres,
      }) as number;
      if (rc !== TPM_SUCCESS) throw new VtpmError('ELIBTPMS', `TPMLIB_RegisterCallbacks failed with ${rc}`);
    },
    dispose() {
      for (const r of registered) koffi.unregister(r);
      registered = [];
      if (copyDir) rmSync(copyDir, { recursive: true, force: true });
    },
  };
  return api;
}
