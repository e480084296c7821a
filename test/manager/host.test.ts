// The manager through the `vtpm` CLI, as an operator uses it: host start/status/stop,
// create/list/destroy, the table surviving restarts, and the refusals (rolled-back or
// tampered table, another host's hardware TPM, a missing sealed key), plus bad input on
// the control socket.
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { encode } from 'cbor-x';
import { stopHostAfterTest, vtpm } from '../guest/host.ts';

interface Host {
  run: string;
  state: string;
  hw: string;
  args: string[];
}

function newHost(tt: Test, hwDir?: string): Host {
  const base = mkdtempSync(join(tmpdir(), 'vtpm-mgr-'));
  const h = { run: join(base, 'run'), state: join(base, 'state'), hw: hwDir ?? join(base, 'hwtpm'), args: [] as string[] };
  h.args = ['--run-dir', h.run];
  tt.teardown(async () => {
    try {
      await stopHostAfterTest(h.run);
    } finally {
      rmSync(base, { recursive: true, force: true });
    }
  });
  return h;
}

const start = (h: Host, extra: string[] = []) => vtpm(['host', 'start', '--state-dir', h.state, '--hw', `tis:${h.hw}`, ...h.args, ...extra], 120_000);
const stop = (h: Host) => vtpm(['host', 'stop', ...h.args], 60_000);
const json = async (h: Host, args: string[]) => {
  const r = await vtpm([...args, ...h.args, '--json']);
  if (r.code !== 0) throw new Error(`vtpm ${args.join(' ')}: ${r.stderr}`);
  return JSON.parse(r.stdout);
};

t.test('host start, create, list, restart: the table survives, epochs move on', async (t) => {
  const h = newHost(t);
  const s = await start(h);
  t.equal(s.code, 0, `host start: ${s.stderr}`);
  t.match(s.stdout, /manager running .*epoch \d+/);
  const again = await start(h);
  t.not(again.code, 0, 'a second manager for the same run dir is refused');
  t.match(again.stderr, /already runs/);
  // The daemon itself refuses too, before it touches the hardware counter or the table.
  const epochBefore = (await json(h, ['host', 'status'])).epoch;
  const tableBefore = readFileSync(join(h.state, 'table'));
  const direct = spawnSync(process.execPath, ['--import', 'tsx', join(import.meta.dirname, '../../manager/daemon.ts'), '--state-dir', h.state, '--run-dir', h.run, '--hw', `tis:${h.hw}`], { encoding: 'utf8', timeout: 60_000, env: { ...process.env, NODE_OPTIONS: '' } });
  t.equal(direct.status, 1, 'a second daemon for the same run dir exits 1');
  t.match(direct.stderr, /a manager already serves/);
  t.same(readFileSync(join(h.state, 'table')), tableBefore, 'the refused daemon did not rewrite the table');
  t.equal((await json(h, ['host', 'status'])).epoch, epochBefore, 'the running manager kept its epoch');
  const after = await vtpm(['create', 'probe', ...h.args]);
  t.equal(after.code, 0, `the running manager can still change its table (the counter did not move under it): ${after.stderr.trim()}`);
  t.equal((await vtpm(['destroy', 'probe', ...h.args])).code, 0);

  const a = await json(h, ['create', 'web', '--tpm', '2.0']);
  t.match(a, { name: 'web', tpm: '2.0', uuid: /^[0-9a-f-]{36}$/ });
  await json(h, ['create', 'legacy', '--tpm', '1.2']);
  const dup = await vtpm(['create', 'web', ...h.args]);
  t.not(dup.code, 0, 'a name is bound to one instance');
  t.match(dup.stderr, /already exists/);
  const bad = await vtpm(['create', 'Bad/Name', ...h.args]);
  t.not(bad.code, 0, 'a bad name is refused by the CLI');
  for (const pcrs of ['0,,2', '24', 'a', '1.5']) {
    const r = await vtpm(['host', 'start', '--pcrs', pcrs, ...h.args]);
    t.not(r.code, 0, `--pcrs ${pcrs} is refused`);
    t.equal(r.stderr.trim().split('\n').length, 1, 'in one line');
  }

  const st1 = await json(h, ['host', 'status']);
  t.equal(st1.instances, 2);
  t.same(st1.pcrs, [0, 2, 4, 7], 'sealed to the default PCRs');
  t.equal((await stop(h)).code, 0, 'host stop');

  t.equal((await start(h)).code, 0, 'host start again');
  const list = await json(h, ['list']);
  t.same(list.map((i: { name: string }) => i.name).sort(), ['legacy', 'web']);
  t.equal(list.find((i: { name: string }) => i.name === 'web').uuid, a.uuid, 'same uuid after a restart');
  const st2 = await json(h, ['host', 'status']);
  t.ok(st2.epoch > st1.epoch, `epoch moved on (${st1.epoch} → ${st2.epoch})`);

  // Table changes arriving together are applied one after the other, none lost or refused.
  const many = await Promise.all(['c1', 'c2', 'c3', 'c4', 'c5'].map((n) => vtpm(['create', n, ...h.args])));
  t.same(many.map((r) => r.code), [0, 0, 0, 0, 0], `five concurrent creates: ${many.map((r) => r.stderr.trim()).join(' ')}`);
  const gone = await Promise.all(['c1', 'c2', 'c3', 'c4', 'c5'].map((n) => vtpm(['destroy', n, ...h.args])));
  t.same(gone.map((r) => r.code), [0, 0, 0, 0, 0], 'five concurrent destroys');

  const d = await vtpm(['destroy', 'legacy', ...h.args]);
  t.equal(d.code, 0, `destroy: ${d.stderr}`);
  t.same((await json(h, ['list'])).map((i: { name: string }) => i.name), ['web']);

  // Modes: nothing in the state or run dir is readable by others.
  for (const dir of [h.state, h.run]) {
    t.equal(statSync(dir).mode & 0o777, 0o700, `${dir} is 0700`);
    for (const f of readdirSync(dir)) {
      const st = statSync(join(dir, f));
      if (st.isFile() || st.isSocket()) t.equal(st.mode & 0o077, 0, `${f} is not group/other accessible`);
    }
  }
  t.equal((await stop(h)).code, 0);
  const none = await vtpm(['list', ...h.args]);
  t.not(none.code, 0, 'list without a manager fails');
  t.match(none.stderr, /no manager runs/);
});

t.test('an old table put back, a flipped byte, another TPM, a lost key: refused, nothing overwritten', async (t) => {
  const h = newHost(t);
  t.equal((await start(h)).code, 0);
  await json(h, ['create', 'one']);
  await stop(h);
  const old = join(h.state, 'table.old');
  copyFileSync(join(h.state, 'table'), old);
  t.equal((await start(h)).code, 0);
  await json(h, ['create', 'two']);
  await stop(h);

  const current = readFileSync(join(h.state, 'table'));
  copyFileSync(old, join(h.state, 'table'));
  const rolled = await start(h);
  t.not(rolled.code, 0, 'an old table is refused');
  t.match(rolled.stderr, /rollback refused.*old copy/);
  t.same(readFileSync(join(h.state, 'table')), readFileSync(old), 'the refused start wrote nothing');

  const flipped = Buffer.from(current);
  flipped[flipped.length >> 1]! ^= 0x01; // inside the ciphertext
  writeFileSync(join(h.state, 'table'), flipped);
  const tampered = await start(h);
  t.not(tampered.code, 0, 'a tampered table is refused');
  t.match(tampered.stderr, /integrity check failed/);

  writeFileSync(join(h.state, 'table'), current);
  const other = newHost(t);
  const foreign = await vtpm(['host', 'start', '--state-dir', h.state, '--hw', `tis:${other.hw}`, ...other.args], 120_000);
  t.not(foreign.code, 0, "another host's hardware TPM cannot unseal the root key");

  rmSync(join(h.state, 'root.sealed'));
  const lost = await start(h);
  t.not(lost.code, 0, 'a state dir without its sealed key is refused');
  t.match(lost.stderr, /no sealed root key/);
  t.same(readFileSync(join(h.state, 'table')), current, 'and the table was not replaced');
});

t.test('a changed firmware measurement (hardware PCR 0) refuses the start, naming the PCR, and overwrites nothing', async (t) => {
  const h = newHost(t);
  const measure = (what: string) => vtpm(['hw', 'measure', what, '--hw', `tis:${h.hw}`, '--pcr', '0']);
  t.equal((await measure('firmware 1.0')).code, 0, 'the modelled firmware measures itself into PCR 0');
  t.equal((await start(h)).code, 0, 'host start seals the root key to PCRs 0,2,4,7 as measured');
  await json(h, ['create', 'one']);
  t.equal((await stop(h)).code, 0);
  t.equal((await start(h)).code, 0, 'same firmware, same PCRs: it starts again');
  t.equal((await stop(h)).code, 0);
  const files = () =>
    (readdirSync(h.state, { recursive: true }) as string[])
      .filter((f) => statSync(join(h.state, f)).isFile())
      .sort()
      .map((f) => [f, readFileSync(join(h.state, f)).toString('hex')]);
  const before = files();
  t.equal((await measure('a boot loader nobody signed')).code, 0, 'the boot chain changes');
  const refused = await start(h);
  t.not(refused.code, 0, 'the manager refuses to start');
  t.match(refused.stderr, /PCRs changed.*PCR 0/, 'and says which PCR differs');
  t.same(files(), before, 'nothing in the state dir was overwritten');
});

t.test('the control socket: garbage, oversized frames, unknown ops and wrong types get errors; the manager lives', async (t) => {
  const h = newHost(t);
  t.equal((await start(h)).code, 0);
  const sock = join(h.run, 'manager.sock');
  const exchange = (bytes: Buffer, waitMs = 500) =>
    new Promise<Buffer>((resolve) => {
      const s = net.connect(sock);
      const got: Buffer[] = [];
      s.on('data', (d) => got.push(d));
      s.on('connect', () => s.write(bytes));
      s.on('error', () => resolve(Buffer.concat(got)));
      setTimeout(() => {
        s.destroy();
        resolve(Buffer.concat(got));
      }, waitMs);
    });
  const frame = (m: unknown) => {
    const body = encode(m);
    const head = Buffer.alloc(4);
    head.writeUInt32BE(body.length);
    return Buffer.concat([head, body]);
  };
  const replies = [
    await exchange(Buffer.from('this is not CBOR at all, just text\n')),
    await exchange(Buffer.from([0xff, 0xff, 0xff, 0xff, 1, 2, 3])),
    await exchange(frame({ v: 1, id: 1, op: 'launch-missiles', control: 1 })),
    await exchange(frame({ v: 1, id: 2, op: 'create', control: 1, name: 42 })),
    await exchange(frame({ v: 1, id: 3, op: 'create', control: 1, name: 'x'.repeat(500) })),
    await exchange(frame({ v: 1, id: 4, op: 'create', control: 1, name: 'ok', tpm: '3.0' })),
    await exchange(frame({ v: 1, id: 5, op: 'list' })),
    await exchange(frame([1, 2, 3])),
  ];
  t.ok(replies[0]!.length === 0 || replies[0]!.includes(Buffer.from('E')), 'garbage: an error or a closed connection');
  t.ok(replies[1]!.includes(Buffer.from('EOVERSIZE')), 'oversized frame: EOVERSIZE');
  t.ok(replies[2]!.includes(Buffer.from('unknown operation')), 'unknown op');
  t.ok(replies[3]!.includes(Buffer.from('field name')), 'wrong type named');
  t.ok(replies[4]!.includes(Buffer.from('field name')), 'over-long name refused');
  t.ok(replies[5]!.includes(Buffer.from('field tpm')), 'bad TPM version refused');
  t.ok(replies[6]!.includes(Buffer.from('EPROTO')), 'missing control version refused');
  t.ok(replies[7]!.includes(Buffer.from('EPROTO')), 'a frame that is not a map refused');
  const st = await json(h, ['host', 'status']);
  t.equal(st.instances, 0, 'nothing was created by the bad requests, and the manager still answers');
});
