// stateLinkHandler called directly (the bytes a serve loop would hand it), for what a link
// test cannot easily reach: error replies that must be cut to fit the page, bounded logs.
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { decode } from 'cbor-x';
import { DirStateStore } from '../../drivers/host/state-dir.ts';
import { MemoryStateStore } from '../../drivers/tpm/engine.ts';
import { MAX_TPMIF_DATA } from '../../drivers/xen/tpmif-page.ts';
import { decodeReply, encodeRequest } from '../../drivers/statelink/protocol.ts';
import { stateLinkHandler } from '../../drivers/statelink/server.ts';
import { errorFromWire } from '../../drivers/base/errors.ts';
import { codeChain } from './links.ts';

const uuid = randomUUID();

t.test('a backend error with long messages is cut to fit one reply, codes kept', async (t) => {
  const root = mkdtempSync(join(tmpdir(), 'vtpm-statelink-h-'));
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  let dir = root;
  for (let i = 0; i < 12; i++) dir = join(dir, 'd'.repeat(250));
  const backend = new DirStateStore(dir);
  rmSync(dir, { recursive: true });
  writeFileSync(dir, 'not a directory'); // every write below it now fails with ENOTDIR
  const lines: string[] = [];
  const h = stateLinkHandler({ uuid, backend, log: (l) => lines.push(l) });
  const rsp = h(encodeRequest({ op: 'store', uuid, name: 'permall', total: 4, offset: 0, data: new Uint8Array(4) }), 0);
  t.ok(rsp.length <= MAX_TPMIF_DATA, `the reply (${rsp.length} bytes) fits the page`);
  const r = decodeReply(rsp, 'store');
  t.ok('error' in r, 'an error reply');
  if ('error' in r) t.same([r.error.code, r.error.cause?.code], ['ESTATE', 'ENOTDIR'], 'the backend’s code and its cause’s code travel');
  if ('error' in r) t.ok(codeChain(errorFromWire(r.error)).includes('ENOTDIR'), 'errorFromWire keeps ENOTDIR in the chain');
  t.equal(lines.length, 1, 'the failure is logged once');
});

t.test('refusals are logged with a bound; a throwing log never fails the handler', async (t) => {
  const lines: string[] = [];
  const h = stateLinkHandler({ uuid, backend: new MemoryStateStore(), log: (l) => lines.push(l) });
  for (let i = 0; i < 100; i++) h(new Uint8Array([0xff, i]), 0);
  t.ok(lines.length <= 33, `100 garbage requests, ${lines.length} log lines`);
  t.match(lines.at(-1), /not logged/, 'the last line says the rest is not logged');
  for (let i = 0; i < 40; i++) h(encodeRequest({ op: 'delete', uuid: randomUUID(), name: 'permall' }), 0);
  t.equal(lines.filter((l) => l.includes('refused a request for instance')).length, 16, 'at most 16 distinct offenders are logged');
  const loud = stateLinkHandler({
    uuid,
    backend: new MemoryStateStore(),
    log: () => {
      throw new Error('log sink gone');
    },
  });
  const r = decode(loud(new Uint8Array([0xff]), 0)) as { ok: boolean; error: { code: string } };
  t.same([r.ok, r.error.code], [false, 'EPROTO'], 'still an error reply');
  t.same(decode(loud(encodeRequest({ op: 'load', uuid, name: 'x', offset: 0 }), 0)), { v: 1, ok: true, found: false }, 'and the next request is served');
});
