// A QEMU/KVM guest on a manager-protected vTPM, end to end: `vtpm start vm1 --qemu` prints
// QEMU's arguments; a real Linux kernel boots with them (q35, TCG), finds the TPM through
// its own tpm_tis / tpm_crb driver, extends a PCR and defines + writes an NV index through
// /dev/tpm0 with busybox, and powers off. The host side then finds the guest's NV index:
// the same instance started as a tpm0 node (`vtpm stop` / `vtpm start`), read with
// tpm2-tools — its state went to the manager, sealed, like every guest's.
import t from 'tap';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { bootGuest, guestUnavailable, guestValues, printfOctal, responseCode, tpmCmdFunction } from '../../scripts/support/qemu-guest.ts';
import { tpm2Tools } from '../clients/tpm2-tools.ts';
import { scratchDir } from '../clients/run.ts';
import { extend256, NV_INDEX, nvDefine, nvWrite, sha256 } from '../swtpm_ctrl/tpm-cmds.ts';
import { TestHost, vtpm } from './host.ts';

const P = 'VTPM-GUEST';
const digest = sha256(Buffer.from('measured inside a QEMU guest'));

function guestScript(nvData: Buffer): string {
  return [
    tpmCmdFunction(P),
    `echo "${P} tpm0=$([ -e /sys/class/tpm/tpm0 ] && echo yes || echo no)"`,
    `echo "${P} major=$(cat /sys/class/tpm/tpm0/tpm_version_major)"`,
    `echo "${P} pcr16before=$(cat /sys/class/tpm/tpm0/pcr-sha256/16)"`,
    `tpmcmd extend '${printfOctal(extend256(16, digest))}'`,
    `tpmcmd nvdefine '${printfOctal(nvDefine(nvData.length))}'`,
    `tpmcmd nvwrite '${printfOctal(nvWrite(nvData))}'`,
    `echo "${P} pcr16after=$(cat /sys/class/tpm/tpm0/pcr-sha256/16)"`,
  ].join('\n');
}

const why = guestUnavailable();
if (why) t.fail(`no QEMU guest can boot here (scripts/setup.sh installs it): ${why}`);
else {
  for (const device of ['tpm-tis', 'tpm-crb'] as const) {
    t.test(`a Linux guest under QEMU (${device}) uses its manager-protected vTPM`, async (t) => {
      const host = new TestHost(t);
      await host.hostStart();
      const name = device === 'tpm-tis' ? 'vm-tis' : 'vm-crb';
      t.equal((await vtpm(['create', name, ...host.args])).code, 0, `vtpm create ${name}`);
      const s = await vtpm(['start', name, '--qemu', '--device', device, '--json', ...host.args], 120_000);
      t.equal(s.code, 0, `vtpm start --qemu${s.code ? `: ${s.stderr}` : ''}`);
      const out = JSON.parse(s.stdout) as { ctrl: string; qemu: string[] };
      t.ok(existsSync(out.ctrl), 'the control socket is there');
      t.same(out.qemu.slice(0, 2), ['-chardev', `socket,id=chrtpm0,path=${out.ctrl}`], 'the -chardev argument names it');
      t.equal(out.qemu[5], `${device},tpmdev=tpm0`, `the -device argument is ${device}`);
      t.equal((await host.row(name)).state, 'running', 'vtpm list: running (as a QEMU device)');

      const nvData = Buffer.from(`nv ${device}`.padEnd(12, '.'));
      const run = await bootGuest({ tpmArgs: out.qemu, script: guestScript(nvData), initrd: join(scratchDir(t, 'initrd'), 'initrd.gz') });
      const kv = guestValues(P, run.lines);
      t.notOk(run.timedOut, `the guest powered off by itself (${run.ms} ms)`);
      t.equal(kv.tpm0, 'yes', "the guest kernel's driver found the TPM (/sys/class/tpm/tpm0)");
      t.equal(kv.major, '2', 'a TPM 2.0');
      t.equal(kv.pcr16before, '0'.repeat(64), 'PCR 16 starts at zero in sysfs');
      t.equal(responseCode(kv.extend), 0, 'PCR_Extend from the guest');
      t.equal(kv.pcr16after, sha256(Buffer.alloc(32), digest).toString('hex').toUpperCase(), "the guest's sysfs shows PCR 16 = H(0 || digest)");
      t.equal(responseCode(kv.nvdefine), 0, 'NV_DefineSpace from the guest');
      t.equal(responseCode(kv.nvwrite), 0, 'NV_Write from the guest');
      if (responseCode(kv.nvwrite) !== 0) t.comment(run.lines.slice(-30).join('\n'));
      t.equal((await host.row(name)).state, 'running', 'after the VM powered off the instance still serves the next VM start');

      // The same instance as a tpm0 node: what the guest wrote is in its manager-held state.
      await host.stop(t, name);
      const st = await vtpm(['start', name, ...host.args], 120_000);
      t.equal(st.code, 0, `vtpm start (a tpm0 node)${st.code ? `: ${st.stderr}` : ''}`);
      const node = st.stdout.trim();
      const nv = await tpm2Tools(t, `device:${node}`).nvRead(NV_INDEX, nvData.length);
      t.equal(nv.toString(), nvData.toString(), "the host reads the guest's NV index through the instance's tpm0");
      const both = await vtpm(['start', name, '--qemu', ...host.args]);
      t.not(both.code, 0, 'a QEMU device and a tpm0 node at once is refused');
      t.match(both.stderr, /already running/, 'saying it runs already');
    });
  }
}

if (!why) {
  t.test("the host reads a running QEMU guest's PCR: vtpm suspend while the VM runs, resume as a tpm0 node", async (t) => {
    const host = new TestHost(t);
    await host.hostStart();
    t.equal((await vtpm(['create', 'vm-live', ...host.args])).code, 0, 'vtpm create vm-live');
    const s = await vtpm(['start', 'vm-live', '--qemu', '--json', ...host.args], 120_000);
    t.equal(s.code, 0, `vtpm start --qemu${s.code ? `: ${s.stderr}` : ''}`);
    const { qemu } = JSON.parse(s.stdout) as { qemu: string[] };
    const nvData = Buffer.from('live guest..');
    const script = [guestScript(nvData), `echo "${P} ready=1"`, 'sleep 600'].join('\n');
    let suspended: Promise<{ code: number; stderr: string }> | undefined;
    const run = await bootGuest({
      tpmArgs: qemu,
      script,
      initrd: join(scratchDir(t, 'initrd'), 'initrd.gz'),
      // The guest has measured and waits: suspend its vTPM under it, then pull the VM's plug.
      onLine: (line, kill) => {
        if (!line.includes(`${P} ready=1`) || suspended) return;
        suspended = vtpm(['suspend', 'vm-live', ...host.args], 120_000).finally(kill);
      },
    });
    const kv = guestValues(P, run.lines);
    t.equal(responseCode(kv.extend), 0, 'the guest extended PCR 16');
    t.equal(responseCode(kv.nvwrite), 0, 'and wrote its NV index');
    t.ok(suspended, 'the guest said it was ready');
    const sr = await suspended!;
    t.equal(sr.code, 0, `vtpm suspend while the VM ran${sr.code ? `: ${sr.stderr}` : ''}`);
    const r = await vtpm(['resume', 'vm-live', ...host.args], 120_000);
    t.equal(r.code, 0, `vtpm resume as a tpm0 node${r.code ? `: ${r.stderr}` : ''}`);
    const tools = tpm2Tools(t, `device:${r.stdout.trim()}`);
    t.equal((await tools.pcrRead(16)).toString('hex').toUpperCase(), kv.pcr16after, "the host reads the guest's PCR 16 value");
    t.equal((await tools.nvRead(NV_INDEX, nvData.length)).toString(), nvData.toString(), "and the guest's NV index");
  });
}
