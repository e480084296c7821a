// Field checks for messages on wires we define (control API, state requests): every field
// is checked for type and bounds before use, and a refusal names the field.
import { VtpmError } from './errors.ts';
import type { Msg } from './frame.ts';

function bad(key: string, want: string, got: unknown): VtpmError {
  const shown = got === undefined ? 'nothing' : typeof got === 'string' ? JSON.stringify(got.slice(0, 40)) : typeof got;
  return new VtpmError('EINVAL', `field ${key}: expected ${want}, got ${shown}`);
}

export function str(m: Msg, key: string, o: { pattern?: RegExp; max?: number; what?: string } = {}): string {
  const v = m[key];
  const max = o.max ?? 256;
  if (typeof v !== 'string' || v.length > max || (o.pattern && !o.pattern.test(v))) throw bad(key, o.what ?? `a string of at most ${max} characters`, v);
  return v;
}

export function optStr(m: Msg, key: string, o: { pattern?: RegExp; max?: number; what?: string } = {}): string | undefined {
  return m[key] === undefined ? undefined : str(m, key, o);
}

export function oneOf<T extends string>(m: Msg, key: string, values: readonly T[], fallback?: T): T {
  const v = m[key] === undefined ? fallback : m[key];
  if (typeof v !== 'string' || !values.includes(v as T)) throw bad(key, `one of ${values.join(', ')}`, v);
  return v as T;
}

export function int(m: Msg, key: string, min: number, max: number): number {
  const v = m[key];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw bad(key, `an integer in ${min}..${max}`, v);
  return v;
}

export function bool(m: Msg, key: string, fallback: boolean): boolean {
  const v = m[key] === undefined ? fallback : m[key];
  if (typeof v !== 'boolean') throw bad(key, 'true or false', v);
  return v;
}

export function bytes(m: Msg, key: string, max: number): Uint8Array {
  const v = m[key];
  if (!(v instanceof Uint8Array) || v.length > max) throw bad(key, `bytes (at most ${max})`, v);
  return v;
}
