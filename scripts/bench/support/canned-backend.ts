// A backend that answers every command with one fixed GetRandom response at once: with the
// raw front end it gives the FUSE crossing alone (the benchmark's floor for that hop).
import { fileURLToPath } from 'node:url';
import type { TransportSpec, SyncTransport } from '../../../drivers/tpm/transport.ts';

const RESPONSE = Buffer.from('80010000001c0000000000102f8e3a8c05d6a4ea5ac3b0b39eab2ac8', 'hex');

export const cannedBackendSpec: TransportSpec = { module: fileURLToPath(import.meta.url), export: 'createCannedBackend', params: null };

export function createCannedBackend(): SyncTransport {
  return { transmitSync: () => RESPONSE, close: () => undefined };
}
