// The authority process: its request table as seen on the wire, and the two lifetimes
// startAuthority offers (tied to the starter, or detached with a log).
import t from 'tap';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { FrameReader, PROTO_VERSION, encodeFrame, type Msg } from '../../drivers/base/frame.ts';
import { authorityRunning, startAuthority } from '../../drivers/xen/authority-launch.ts';
import { Domain } from '../../drivers/xen/domain.ts';
import { memPath, socketPath } from '../../drivers/xen/layout.ts';
import { withAuthority } from './agent.ts';

const here = path.dirname(fileURLToPath(import.meta.url));

/** A raw connection: send a request, get its reply. */
async function rawClient(dir: string) {
  const s = net.connect(socketPath(dir));
  await new Promise<void>((r) => s.once('connect', () => r()));
  const reader = new FrameReader();
  const replies: Msg[] = [];
  let wake: (() => void) | null = null;
  s.on('data', (c) => {
    for (const r of reader.push(c)) if ('msg' in r && r.msg.ev === undefined) replies.push(r.msg);
    wake?.();
  });
  let id = 0;
  return {
    async call(op: unknown, args: Record<string, unknown> = {}): Promise<Msg> {
      const my = ++id;
      s.write(encodeFrame({ v: PROTO_VERSION, id: my, op, ...args }));
      for (;;) {
        const i = replies.findIndex((m) => m.id === my);
        if (i >= 0) return replies.splice(i, 1)[0]!;
        await new Promise<void>((r) => (wake = r));
      }
    },
    close: () => s.destroy(),
  };
}

async function until(what: string, f: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

t.test('requests: one table; hello first; unknown ops refused; a dead domain is reaped', async (t) => {
  const env = await withAuthority();
  t.teardown(() => env.done());
  const c = await rawClient(env.dir);
  t.teardown(() => c.close());
  t.equal((await c.call('ping')).ok, true, 'ping needs no hello');
  t.equal((await c.call('read', { path: '/local' })).err, 'EPERM', 'any other request before hello → EPERM');
  t.equal((await c.call('frobnicate')).err, 'EINVAL', 'an unknown op → EINVAL');
  t.equal((await c.call('constructor')).err, 'EINVAL', 'an inherited property name is no op');
  t.equal((await c.call(7)).err, 'EINVAL', 'an op that is not a string → EINVAL');
  t.equal((await c.call('hello', { pid: -1 })).err, 'EINVAL', 'hello with a bad pid → EINVAL');
  const h = await c.call('hello', { pid: process.pid, start: 0, name: 'raw' });
  t.ok(Number.isInteger(h.domid) && (h.domid as number) > 0, `hello assigns domid ${h.domid}`);
  t.equal((await c.call('hello', { pid: process.pid })).err, 'EBUSY', 'a second hello on the connection → EBUSY');
  t.equal((await c.call('write', { path: `/local/domain/${h.domid}/k`, value: 1 })).err, 'EINVAL', 'a non-string value → EINVAL');
  t.equal((await c.call('commit', { ops: [{ op: 'chmod', path: '/x' }], reads: [] })).err, 'EINVAL', 'an unknown transaction op → EINVAL');

  const d0 = await Domain.join(env.dir, { host: true });
  t.teardown(() => d0.leave());
  t.same(((await c.call('domains')).domids as number[]).sort(), [0, h.domid].sort(), 'domains lists both');
  let released = 0;
  await d0.store.watch('@releaseDomain', () => released++);
  const before = released;
  t.ok(fs.existsSync(memPath(env.dir, h.domid as number)), 'the domain has its memory file');
  c.close();
  await until('@releaseDomain', () => released > before);
  t.notOk(fs.existsSync(memPath(env.dir, h.domid as number)), 'the dead domain’s memory file is unlinked');
  t.equal(await d0.store.readOpt(`/local/domain/${h.domid}`), undefined, 'and its xenstore subtree removed');
});

t.test('lifetimes: a child authority dies with its starter; a detached one outlives it and logs', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-xen-launch-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const launch = async (sub: string, ...args: string[]): Promise<number> => {
    const d = path.join(dir, sub);
    const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', path.join(here, 'launcher.ts'), d, ...args]);
    return JSON.parse(stdout).pid as number;
  };
  const child = await launch('child', 'child');
  await until('the orphaned authority to exit', () => !alive(child), 5000);
  t.pass('the child authority exited once its starter was gone');
  t.notOk(await authorityRunning(path.join(dir, 'child')), 'nothing answers for its dir');

  const log = path.join(dir, 'authority.log');
  const det = await launch('det', 'detached', log);
  t.teardown(() => (alive(det) ? process.kill(det, 'SIGKILL') : undefined));
  await new Promise((r) => setTimeout(r, 2500)); // longer than the parent check's period
  t.ok(await authorityRunning(path.join(dir, 'det')), 'the detached authority still answers after its starter exited');
  t.equal(fs.statSync(log).mode & 0o777, 0o600, 'its log is 0600');
  process.kill(det, 'SIGTERM');
  await until('the detached authority to stop', () => !alive(det));
  t.notOk(fs.existsSync(socketPath(path.join(dir, 'det'))), 'SIGTERM: it removed its socket');

  await t.rejects(startAuthority(path.join(dir, 'x'), { lifetime: 'detached' }), { code: 'EINVAL' }, 'detached without a log → EINVAL');
});
