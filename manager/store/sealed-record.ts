// A small host-wide record sealed under the root key (the host's identity keys, its
// trusted hosts): CBOR { v: 1, iv, ct, tag }, AES-256-GCM with the record's kind and the
// format version as associated data, so one kind of record cannot stand in for another.
// Written durably; read with a size bound; anything wrong with the file is EINTEGRITY.
import { decode, encode } from 'cbor-x';
import { readBounded } from '../../drivers/host/state-dir.ts';
import { VtpmError } from '../../drivers/base/errors.ts';
import { checkKey, open, seal } from './crypto.ts';
import { FORMAT_VERSION, asBuffer, decodeRecord, sealedFields, writeDurable } from './sealed-file.ts';

const ENVELOPE = ['v', 'iv', 'ct', 'tag'] as const;

const aad = (kind: string) => encode([`vtpm-${kind}`, FORMAT_VERSION]);

export function writeSealedRecord(file: string, rootKey: Uint8Array, kind: string, value: unknown): void {
  checkKey(rootKey, 'the root key');
  const { iv, ct, tag } = seal(rootKey, encode(value), aad(kind));
  writeDurable(file, encode({ v: FORMAT_VERSION, iv, ct, tag }), `the ${kind} record`);
}

/** The record's value, or undefined when there is no file. */
export function readSealedRecord(file: string, rootKey: Uint8Array, kind: string, max: number): unknown {
  const bytes = readBounded(file, max, `the ${kind} record`);
  if (bytes === undefined) return undefined;
  const what = `the ${kind} record (${file})`;
  const plain = open(rootKey, sealedFields(decodeRecord(bytes, what, ENVELOPE), what), aad(kind), what);
  try {
    return decode(asBuffer(plain));
  } catch (e) {
    throw new VtpmError('EINTEGRITY', `${what}: not a CBOR value`, { cause: e });
  }
}
