import t from 'tap';
import { Reader, Writer } from '../../drivers/tpm/marshal.ts';

t.test('writer then reader round trip', async (t) => {
  const w = new Writer(4);
  w.u8(0xab).u16(0x1234).u32(0xdeadbeef).u64(0x0102030405060708n).sized16(new Uint8Array([1, 2, 3])).sized32(new Uint8Array([9]));
  const r = new Reader(w.finish());
  t.equal(r.u8(), 0xab);
  t.equal(r.u16(), 0x1234);
  t.equal(r.u32(), 0xdeadbeef);
  t.equal(r.u64(), 0x0102030405060708n);
  t.same([...r.sized16()], [1, 2, 3]);
  t.same([...r.sized32()], [9]);
  t.equal(r.remaining, 0);
  r.expectEnd();
});

t.test('reading past the end is a typed error', async (t) => {
  const r = new Reader(new Uint8Array([0, 5, 1, 2]));
  t.throws(() => r.sized16(), { name: 'VtpmError', code: 'ETRUNC' });
  const r2 = new Reader(new Uint8Array([1, 2, 3]));
  t.throws(() => r2.u32(), { name: 'VtpmError', code: 'ETRUNC' });
  const r3 = new Reader(new Uint8Array([0xff, 0xff]));
  t.throws(() => r3.sized16('x', 16), { name: 'VtpmError', code: 'EOVERSIZE' });
});

t.test('sub-reader is bounded and patching works', async (t) => {
  const w = new Writer();
  const at = w.mark32();
  w.u16(7);
  w.patch32(at, w.length);
  const r = new Reader(w.finish());
  t.equal(r.u32(), 6);
  const s = r.sub(2);
  t.equal(s.u16(), 7);
  t.throws(() => s.u8(), { name: 'VtpmError', code: 'ETRUNC' });
  const trailing = new Reader(new Uint8Array([1, 2]));
  trailing.u8();
  t.throws(() => trailing.expectEnd(), { name: 'VtpmError', code: 'EINVAL' });
});

t.test('writer grows past its initial size without losing bytes', async (t) => {
  const w = new Writer(2);
  const big = new Uint8Array(100).map((_, i) => i);
  w.u8(1).bytes(big).u8(2).u16(0x0304);
  const out = w.finish();
  t.equal(out.length, 104);
  t.same([...out.subarray(0, 3)], [1, 0, 1]);
  t.same([...out.subarray(100)], [99, 2, 3, 4]);
});
