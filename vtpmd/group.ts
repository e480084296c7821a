// vtpmd --dir DIR --group G [--threads N]: one process hosting the vTPM engines of a trust
// group (DESIGN.md "Process model (density)"), in place of one vtpmd per vTPM. Each member
// has its own domain, state link and guest back end (group-member.ts); its engine runs on
// one of N engine threads (default 2, group-pool.ts / group-worker.ts), on its own copy of
// libtpms.
//
// Control: RPC (drivers/base/rpc.ts, CBOR frames) on DIR/groups/G.sock, mode 0600; every
// request carries `group: GROUP_VERSION`, every field is checked before use:
//   add     {name, tpm, uuid}        → {domid}    joins the member's domain (vtpmd-NAME)
//   link    {name, manager, front}   → {thread}   state link, TPM booted, guest back end up
//   stop    {name}                   → {}         orderly TPM shutdown; links closed; domain left
//   suspend {name}                   → {bytes}    volatile state stored; engine ended, no shutdown
//   list                             → {engines: MemberInfo[]}
// Readiness (drivers/host/daemon.ts): {socket, domid} once the threads wait and the socket
// takes requests. One member's failure (its store, its front end, its state link) is its
// own; SIGTERM/SIGINT stop every member orderly and exit 0; the process dying (kill -9)
// closes every member's channels, so each guest's next command fails with EIO.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { describeError, VtpmError } from '../drivers/base/errors.ts';
import type { Msg } from '../drivers/base/frame.ts';
import { dropStartupGarbage } from '../drivers/base/modules.ts';
import { RpcServer } from '../drivers/base/rpc.ts';
import * as field from '../drivers/base/validate.ts';
import { reportReady } from '../drivers/host/daemon.ts';
import { Domain } from '../drivers/xen/domain.ts';
import { EnginePool } from './group-pool.ts';
import { Member } from './group-member.ts';

/** Protocol of the group control RPC (inside the frame's own version). */
export const GROUP_VERSION = 1;
/** A group's name (its socket's file name). */
export const GROUP_NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;
/** Instance names, as the manager gives them. */
const INSTANCE = { pattern: /^[a-z0-9][a-z0-9_-]{0,31}$/, what: 'an instance name (1-32 of a-z 0-9 _ -)' };
const UUID = { pattern: /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, what: 'a lower-case uuid' };
/** Engines one group hosts at most (each is a domain, a libtpms copy and two links). */
export const MAX_MEMBERS = 128;
export const MAX_THREADS = 16;

/** The control socket of group `group` under run dir `dir`. */
export function groupSocket(dir: string, group: string): string {
  return join(dir, 'groups', `${group}.sock`);
}

function log(msg: string): void {
  console.error(`${new Date().toISOString()} vtpmd group: ${msg}`);
}

export async function groupMain(dir: string, group: string, threads: number): Promise<void> {
  if (!GROUP_NAME.test(group)) throw new VtpmError('EINVAL', `bad group name ${JSON.stringify(group.slice(0, 40))} (1-32 of a-z 0-9 _ -)`);
  if (!Number.isInteger(threads) || threads < 1 || threads > MAX_THREADS) throw new VtpmError('EINVAL', `--threads must be 1..${MAX_THREADS}`);
  const groupDom = await Domain.join(dir, { name: `vtpmd-group-${group}` });
  const members = new Map<string, Member>();
  const pool: EnginePool = await EnginePool.start(groupDom, threads, {
    onClosed: (name) => members.get(name)?.guestClosed(),
    onDied: (e) => {
      // Its engines are gone and their guests would wait for nobody: the whole group ends
      // (the other threads too, at once), its guests see EIO, the manager restarts it.
      log(`${describeError(e)}: the group ends`);
      void pool.abort().finally(() => process.exit(1));
    },
  });
  mkdirSync(join(dir, 'groups'), { recursive: true, mode: 0o700 });
  const socket = groupSocket(dir, group);
  let stopping = false;
  const member = (m: Msg): Member => {
    const name = field.str(m, 'name', INSTANCE);
    const mb = members.get(name);
    if (!mb) throw new VtpmError('ENOENT', `no member ${name} in group ${group}`);
    return mb;
  };
  const domid = (m: Msg, key: string) => field.int(m, key, 0, 0xffff);

  const ops: Record<string, (m: Msg) => Msg | Promise<Msg>> = {
    list: () => ({ engines: [...members.values()].map((mb) => ({ ...mb.info() })) }),
    add: async (m) => {
      const name = field.str(m, 'name', INSTANCE);
      const tpm = field.oneOf(m, 'tpm', ['1.2', '2.0'] as const);
      const uuid = field.str(m, 'uuid', UUID);
      if (members.has(name)) throw new VtpmError('EBUSY', `${name} is already a member of group ${group}`);
      if (members.size >= MAX_MEMBERS) throw new VtpmError('EBUSY', `group ${group} hosts ${MAX_MEMBERS} engines already`);
      const placeholder = await Member.add(dir, { name, tpm, uuid, log });
      if (members.has(name) || stopping) {
        await placeholder.domain.leave();
        throw new VtpmError('EBUSY', stopping ? `group ${group} is stopping` : `${name} is already a member of group ${group}`);
      }
      members.set(name, placeholder);
      log(`${name}: added (TPM ${tpm}, domain ${placeholder.domain.domid})`);
      return { domid: placeholder.domain.domid };
    },
    link: async (m) => {
      const mb = member(m);
      return { ...(await mb.link(pool, domid(m, 'manager'), domid(m, 'front'))) };
    },
    stop: async (m) => {
      const mb = member(m);
      if (mb.phase === 'stopping' || mb.phase === 'linking') throw new VtpmError('EBUSY', `${mb.name} is ${mb.phase}`);
      await mb.stop(pool);
      members.delete(mb.name);
      return {};
    },
    suspend: async (m) => {
      const mb = member(m);
      try {
        return { bytes: await mb.suspend(pool) };
      } finally {
        if (mb.phase === 'stopping') members.delete(mb.name);
      }
    },
  };

  const server = await RpcServer.listen<null>({
    path: socket,
    what: 'a vtpmd group',
    accept: () => null,
    handle: (m) => {
      const op = ops[m.op as string];
      if (!op) throw new VtpmError('EINVAL', `unknown operation ${JSON.stringify(String(m.op).slice(0, 40))}`);
      if (m.group !== GROUP_VERSION) throw new VtpmError('EPROTO', `group control version ${String(m.group).slice(0, 20)} (this vtpmd speaks ${GROUP_VERSION})`);
      if (stopping) throw new VtpmError('EBUSY', `group ${group} is stopping`);
      return op(m);
    },
  });

  const shutdown = async (why: string, code: number) => {
    if (stopping) return;
    stopping = true;
    log(`stopping ${members.size} engines (${why})`);
    server.close();
    await Promise.all([...members.values()].map((mb) => (mb.phase === 'stopping' ? undefined : mb.stop(pool).catch((e) => log(`${mb.name}: ${describeError(e)}`)))));
    await pool.exit().catch((e) => log(describeError(e)));
    await groupDom.leave().catch(() => {});
    process.exit(code);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM', 0));
  process.on('SIGINT', () => void shutdown('SIGINT', 0));
  groupDom.onLost(() => void shutdown('authority lost', 1));
  dropStartupGarbage();
  reportReady({ ok: true, info: { socket, domid: groupDom.domid, threads } });
  log(`group ${group}: ${threads} engine threads, control socket ${socket}`);
}
