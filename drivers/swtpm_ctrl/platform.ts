// The platform side of a TPM that the control channel reaches and the `Engine` seam does not:
// the TIS signals (_TPM_Hash_Start/Data/End, the tpmEstablished bit), libtpms' info string
// by flags and its buffer size. libtpms exports them as process-global functions
// (tpm_tis.h), acting on the TPM of the library copy they are called on.
import koffi from 'koffi';
import { VtpmError } from '../base/errors.ts';
import { DEFAULT_LIBTPMS } from '../libtpms/binding.ts';
import type { LibtpmsEngine } from '../libtpms/libtpms-engine.ts';
import { TPM_BUFFER_MAX } from './protocol.ts';

export interface PlatformOps {
  /** Each returns a libtpms (TPM 1.2 style) result code. */
  hashStart(): number;
  hashData(data: Uint8Array): number;
  hashEnd(): number;
  getEstablished(): { result: number; established: boolean };
  /** Reset tpmEstablished as if asked from `locality` (the TPM allows 3 and 4 only). */
  resetEstablished(locality: number): number;
  /** TPMLIB_GetInfo(flags): a JSON string. */
  info(flags: number): string;
  /** TPMLIB_SetBufferSize: 0 queries; the answer is what the TPM will use. */
  bufferSize(wanted: number): { size: number; min: number; max: number };
}

/** PlatformOps on the libtpms copy that runs `engine` (the library file at `libraryPath`,
 *  Debian's by default: pass the engine's own path when it runs on a private copy).
 *  The locality the TPM sees during resetEstablished comes from the engine's locality
 *  callback, which reports the locality of the engine's last command: it is set for the
 *  call and put back (LibtpmsEngine has no public setter; see the report). */
export function libtpmsPlatform(engine: LibtpmsEngine, libraryPath = DEFAULT_LIBTPMS): PlatformOps {
  let lib: ReturnType<typeof koffi.load>;
  try {
    lib = koffi.load(libraryPath); // same file → dlopen hands back the engine's handle and globals
  } catch (e) {
    throw new VtpmError('ELIBTPMS', `cannot load libtpms from ${libraryPath}`, { cause: e });
  }
  const f = {
    hashStart: lib.func('uint32_t TPM_IO_Hash_Start(void)'),
    hashData: lib.func('uint32_t TPM_IO_Hash_Data(const uint8_t *data, uint32_t len)'),
    hashEnd: lib.func('uint32_t TPM_IO_Hash_End(void)'),
    estGet: lib.func('uint32_t TPM_IO_TpmEstablished_Get(_Out_ uint8_t *bit)'),
    estReset: lib.func('uint32_t TPM_IO_TpmEstablished_Reset(void)'),
    getInfo: lib.func('void *TPMLIB_GetInfo(int flags)'),
    setBufferSize: lib.func('uint32_t TPMLIB_SetBufferSize(uint32_t wanted, _Out_ uint32_t *min, _Out_ uint32_t *max)'),
  };
  const cfree = koffi.load('libc.so.6').func('void free(void *p)');
  const slot = engine as unknown as { locality: number };
  return {
    hashStart: () => f.hashStart() as number,
    hashData: (data) => f.hashData(data, data.length) as number,
    hashEnd: () => f.hashEnd() as number,
    getEstablished() {
      const bit = [0];
      const result = f.estGet(bit) as number;
      return { result, established: bit[0] !== 0 };
    },
    resetEstablished(locality) {
      const saved = slot.locality;
      slot.locality = locality;
      try {
        return f.estReset() as number;
      } finally {
        slot.locality = saved;
      }
    },
    info(flags) {
      const p = f.getInfo(flags) as bigint | null;
      if (!p) return '{}';
      const s = koffi.decode(p, 'char', -1) as string;
      cfree(p);
      return s;
    },
    bufferSize(wanted) {
      // The engine frames at most TPM_BUFFER_MAX bytes, whatever libtpms could take.
      const min = [0];
      const max = [0];
      const size = f.setBufferSize(Math.min(wanted, TPM_BUFFER_MAX), min, max) as number;
      return { size: Math.min(size, TPM_BUFFER_MAX), min: min[0]!, max: Math.min(max[0]!, TPM_BUFFER_MAX) };
    },
  };
}
