// `vtpm host identity`, `vtpm host trust add|list|remove` and `vtpm migrate`: moving an
// instance to another host's manager, which both hosts must trust (each other's identity,
// created in and certified by their hardware TPMs).
import { readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { VtpmError } from '../../drivers/base/errors.ts';
import type { Msg } from '../../drivers/base/frame.ts';
import { RpcClient } from '../../drivers/base/rpc.ts';
import { CONTROL_VERSION } from '../../manager/control.ts';
import { MAX_DOCUMENT } from '../../manager/migration/identity.ts';
import { DEFAULTS, control } from './host.ts';
import { printTable } from './table.ts';

const runDirOpt = ['--run-dir <dir>', 'runtime dir of the host (VTPM_RUN_DIR)'] as const;

/** An identity file: the raw CBOR document, or its base64 text (what `host identity` prints). */
function readIdentityFile(file: string): Buffer {
  let bytes: Buffer;
  try {
    bytes = readFileSync(file);
  } catch (e) {
    throw new VtpmError('ENOENT', `cannot read ${file}: ${(e as Error).message}`, { cause: e });
  }
  if (bytes.length > 2 * MAX_DOCUMENT) throw new VtpmError('EOVERSIZE', `${file} is ${bytes.length} bytes: not a host identity`);
  const text = bytes.toString('latin1').trim();
  return /^[A-Za-z0-9+/=\s]+$/.test(text) ? Buffer.from(text, 'base64') : bytes;
}

export function registerMigration(program: Command, host: Command): void {
  host
    .command('identity')
    .description("this host's migration identity (keys in its hardware TPM): hand it to the other host's vtpm host trust add")
    .option('--out <file>', 'write the identity document (CBOR) to FILE instead of printing it as base64')
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--json', 'machine-readable output')
    .action(async (o: { out?: string; runDir: string; json?: boolean }) => {
      const r = await control(o.runDir, 'identity');
      const doc = Buffer.from(r.document as Uint8Array);
      if (o.out) writeFileSync(o.out, doc, { mode: 0o644 });
      if (o.json) return console.log(JSON.stringify({ host: r.host, fingerprint: r.fingerprint, ...(o.out ? { file: resolve(o.out) } : { identity: doc.toString('base64') }) }));
      if (o.out) return console.log(`identity of ${String(r.host)} (fingerprint ${String(r.fingerprint)}) written to ${o.out}`);
      console.log(doc.toString('base64'));
    });
  const trust = host.command('trust').description('the hosts this host migrates instances to and accepts them from');
  trust
    .command('add <name> <file>')
    .description("trust the host whose identity FILE holds (what its vtpm host identity wrote), under NAME")
    .option(...runDirOpt, DEFAULTS.runDir())
    .action(async (name: string, file: string, o: { runDir: string }) => {
      const r = await control(o.runDir, 'trust-add', { name, document: readIdentityFile(file) });
      console.log(`trusting ${String(r.name)}: host ${String(r.host)}, fingerprint ${String(r.fingerprint)}`);
    });
  trust
    .command('remove <name>')
    .description('stop trusting a host')
    .option(...runDirOpt, DEFAULTS.runDir())
    .action(async (name: string, o: { runDir: string }) => {
      await control(o.runDir, 'trust-remove', { name });
      console.log(`no longer trusting ${name}`);
    });
  trust
    .command('list')
    .description('the trusted hosts')
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--json', 'machine-readable output')
    .action(async (o: { runDir: string; json?: boolean }) => {
      const hosts = (await control(o.runDir, 'trust-list')).hosts as { name: string; host: string; fingerprint: string }[];
      if (o.json) return console.log(JSON.stringify(hosts));
      if (hosts.length === 0) return console.log('no trusted hosts (add one with: vtpm host trust add NAME FILE)');
      printTable(['NAME', 'HOST', 'FINGERPRINT'], hosts.map((h) => [h.name, h.host, h.fingerprint]));
    });

  program
    .command('migrate <name>')
    .description("move the instance to another host's manager: suspended here, its whole state wrapped for that host's TPM, dropped here once it runs there")
    .requiredOption('--to <addr:port>', "the destination manager's migration address (its --migration-listen)")
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--json', 'machine-readable summary')
    .action(async (name: string, o: { to: string; runDir: string; json?: boolean }) => {
      const sock = join(resolve(o.runDir), 'manager.sock');
      // cli-progress only when a bar is drawn (~20 ms to load).
      const bar = process.stderr.isTTY && !o.json ? new (await import('cli-progress')).SingleBar({ format: ' {phase} [{bar}] {percentage}%', hideCursor: true, clearOnComplete: true }) : null;
      let phase = '';
      const onEvent = (m: Msg) => {
        if (m.ev !== 'progress') return;
        const p = String(m.phase);
        const total = Math.max(1, Number(m.total) || 1);
        if (bar) {
          if (!phase) bar.start(total, 0, { phase: p });
          bar.setTotal(total);
          bar.update(Number(m.done) || 0, { phase: p });
        } else if (p !== phase && !o.json) console.error(`${p}...`);
        phase = p;
      };
      const c = await RpcClient.connect(sock, `the manager at ${sock}`, onEvent).catch((e) => {
        throw new VtpmError('ENOENT', `no manager runs for ${resolve(o.runDir)} (start one with: vtpm host start)`, { cause: e });
      });
      try {
        const r = await c.request('migrate', { control: CONTROL_VERSION, name, to: o.to }, 300_000);
        bar?.stop();
        if (o.json) return console.log(JSON.stringify({ name: r.name, uuid: r.uuid, to: r.to, peer: r.peer, bytes: r.bytes, ms: Math.round(Number(r.ms)) }));
        console.log(`migrated ${String(r.name)} to ${String(r.peer)} (${String(r.to)}) in ${Math.round(Number(r.ms))} ms; it runs there now`);
      } finally {
        bar?.stop();
        await c.end();
      }
    });
}
