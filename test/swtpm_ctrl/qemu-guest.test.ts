// End to end with a real guest kernel: QEMU (q35, TCG) with `-tpmdev emulator` on our
// control socket, tpm-tis and tpm-crb. The guest's kernel finds the TPM (sysfs: tpm0, its
// version, PCRs), then raw commands go through /dev/tpm0 from busybox (PCR_Extend,
// NV_DefineSpace, NV_Write); the test checks the guest's lines, that QEMU's SHUTDOWN ended
// the server, and reads the NV index back through the data channel of a restarted server.
// The same guest against real swtpm first: the recipe's own proof.
import t from 'tap';
import type tap from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { qemuTpmArgs, type TpmDevice } from '../../drivers/swtpm_ctrl/qemu-args.ts';
import { bootGuest, guestUnavailable, guestValues, printfOctal, responseCode, tpmCmdFunction } from '../../scripts/support/qemu-guest.ts';
import { stopChild } from '../../scripts/support/swtpm.ts';
import { dataClient, rcOf, sendRetry, serve } from './helpers.ts';
import { extend256, nvDefine, nvRead, nvWrite, parseNvRead, sha256 } from './tpm-cmds.ts';

const why = guestUnavailable();
if (why) {
  // scripts/setup.sh installs what the guest needs: a machine without it fails here.
  t.fail(`no QEMU guest can boot here: ${why}`);
  t.end();
} else {
  const work = mkdtempSync(join(tmpdir(), 'swtpm-ctrl-qemu-'));
  t.teardown(() => rmSync(work, { recursive: true, force: true }));
  const P = 'VTPM-GUEST';
  const digest = sha256(Buffer.from('measured inside the guest'));
  const nvData = Buffer.from('qemu-nv!');
  const script = [
    tpmCmdFunction(P),
    `echo "${P} tpm0=$([ -e /sys/class/tpm/tpm0 ] && echo yes || echo no)"`,
    `echo "${P} major=$(cat /sys/class/tpm/tpm0/tpm_version_major)"`,
    `echo "${P} pcr0=$(cat /sys/class/tpm/tpm0/pcr-sha256/0)"`,
    `echo "${P} pcr16before=$(cat /sys/class/tpm/tpm0/pcr-sha256/16)"`,
    `tpmcmd extend '${printfOctal(extend256(16, digest))}'`,
    `tpmcmd nvdefine '${printfOctal(nvDefine(nvData.length))}'`,
    `tpmcmd nvwrite '${printfOctal(nvWrite(nvData))}'`,
    `echo "${P} pcr16after=$(cat /sys/class/tpm/tpm0/pcr-sha256/16)"`,
    `echo "${P} done"`,
  ].join('\n');

  const checkGuest = (t: Pick<typeof tap, 'equal' | 'notOk' | 'match' | 'comment'>, run: Awaited<ReturnType<typeof bootGuest>>, what: string) => {
    const kv = guestValues(P, run.lines);
    t.notOk(run.timedOut, `${what}: guest powered off by itself`);
    t.comment(`${what}: boot to power-off ${run.ms} ms`);
    t.equal(kv.tpm0, 'yes', `${what}: /sys/class/tpm/tpm0`);
    t.equal(kv.major, '2', `${what}: TPM 2.0`);
    t.match(kv.pcr0 ?? '', /^[0-9A-F]{64}$/, `${what}: PCRs in sysfs`);
    t.equal(kv.pcr16before, '0'.repeat(64), `${what}: PCR 16 starts at zero`);
    t.equal(responseCode(kv.extend), 0, `${what}: PCR_Extend through /dev/tpm0`);
    t.equal(responseCode(kv.nvdefine), 0, `${what}: NV_DefineSpace`);
    t.equal(responseCode(kv.nvwrite), 0, `${what}: NV_Write`);
    t.equal(kv.pcr16after, sha256(Buffer.alloc(32), digest).toString('hex').toUpperCase(), `${what}: PCR 16 = H(0 || digest)`);
    t.equal(kv.done, undefined);
    if (!kv.nvwrite) t.comment(run.lines.slice(-40).join('\n'));
  };

  t.test('the recipe, against real swtpm', async (t) => {
    const dir = mkdtempSync(join(work, 'swtpm-'));
    const ctrl = join(dir, 'ctrl');
    const sw = spawn('swtpm', ['socket', '--tpm2', '--tpmstate', `dir=${dir}`, '--ctrl', `type=unixio,path=${ctrl}`], { stdio: 'ignore' });
    t.teardown(() => stopChild(sw));
    for (let i = 0; i < 100 && !(await import('node:fs')).existsSync(ctrl); i++) await new Promise((r) => setTimeout(r, 20));
    const run = await bootGuest({ tpmArgs: qemuTpmArgs({ ctrlPath: ctrl }), script, initrd: join(dir, 'initrd.gz') });
    checkGuest(t, run, 'swtpm/tpm-tis');
  });

  for (const device of ['tpm-tis', 'tpm-crb'] as TpmDevice[]) {
    t.test(`a guest on our control socket (${device})`, async (t) => {
      const dir = mkdtempSync(join(work, `${device}-`));
      const state = join(dir, 'state');
      const s = await serve({ tpm: '2.0', dir, state, args: ['--device', device] });
      t.teardown(s.stop);
      t.same(s.qemu, qemuTpmArgs({ ctrlPath: s.ctrl, device }), 'the QEMU arguments the server prints');
      const run = await bootGuest({ tpmArgs: s.qemu, script, initrd: join(dir, 'initrd.gz') });
      checkGuest(t, run, `vtpm/${device}`);
      // QEMU's exit sends CMD_SHUTDOWN: the server ends, as swtpm does.
      const code = await Promise.race([s.exited, new Promise((r) => setTimeout(() => r('still running'), 10000))]);
      t.equal(code, 0, 'QEMU shut the server down');
      // The NVRAM the guest wrote is in the store: a new server on it reads the index back.
      const again = await serve({ tpm: '2.0', dir: mkdtempSync(join(dir, 'again-')), state, args: ['--not-need-init', '--startup-clear'] });
      t.teardown(again.stop);
      const d = await dataClient(again.data);
      t.teardown(d.close);
      const r = await sendRetry(d, nvRead(nvData.length));
      t.equal(rcOf(r), 0, `NV_Read after the guest: ${r.toString('hex')}`);
      t.same(parseNvRead(r), nvData, 'the guest wrote the NV index through our server');
    });
  }
}
