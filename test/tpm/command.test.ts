// The command core: the two header-check modes, the shared failure answers, per-command
// durations, and the one-at-a-time queue every event-loop transport uses.
import t from 'tap';
import { failureResponse, parseHeader, TPM_HEADER_SIZE } from '../../drivers/tpm/command.ts';
import { commandTimeoutMs, DEFAULT_COMMAND_TIMEOUT_MS } from '../../drivers/tpm/durations.ts';
import { CommandQueue } from '../../drivers/tpm/serial.ts';
import * as tpm12 from '../../drivers/tpm/tpm12.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

t.test('parseHeader: a whole message, and a header read on its own', async (t) => {
  const cmd = tpm2.getRandom(8);
  t.same(parseHeader(cmd), { tag: 0x8001, size: 12, code: tpm2.TPM_CC.GetRandom });
  t.throws(() => parseHeader(cmd.subarray(0, 11)), { code: 'EINVAL', message: /size field 12 does not match its 11 bytes/ });
  t.throws(() => parseHeader(cmd.subarray(0, 9)), { code: 'ETRUNC' });
  const head = cmd.subarray(0, TPM_HEADER_SIZE);
  t.equal(parseHeader(head, 'response', { whole: false }).size, 12, 'header mode: the size still to come');
  t.equal(parseHeader(head, 'response', { whole: false, max: 12 }).size, 12, 'at the bound');
  t.throws(() => parseHeader(head, 'response', { whole: false, max: 11 }), { code: 'EIO', message: /response size field 12 is out of range 10\.\.11/ });
  const tiny = Uint8Array.from([0x80, 0x01, 0, 0, 0, 9, 0, 0, 0, 0]);
  t.throws(() => parseHeader(tiny, 'response', { whole: false, max: 4096 }), { code: 'EIO' }, 'a size below the header');
});

t.test('failureResponse: TPM_RC_FAILURE / TPM_FAIL, built once', async (t) => {
  t.equal(hex(failureResponse('2.0')), '80010000000a00000101');
  t.equal(hex(failureResponse('1.2')), '00c40000000a00000009');
  t.equal(failureResponse('2.0'), failureResponse('2.0'), 'the same constant each time');
  t.equal(tpm12.TPM_TAG_RSP_COMMAND, 0x00c4);
  t.equal(tpm2.TPM_ST_NO_SESSIONS, 0x8001);
});

t.test('command durations by family and code', async (t) => {
  t.equal(commandTimeoutMs(tpm2.getRandom(8)), DEFAULT_COMMAND_TIMEOUT_MS);
  t.equal(commandTimeoutMs(tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [0] }])), 750, 'PCR_Read is short');
  const createPrimary = Uint8Array.from([0x80, 0x02, 0, 0, 0, 10, 0, 0, 0x01, 0x31]);
  t.equal(commandTimeoutMs(createPrimary), 300_000, 'CreatePrimary is long-long');
  const takeOwnership = Uint8Array.from([0x00, 0xc2, 0, 0, 0, 10, 0, 0, 0, 0x0d]);
  t.equal(commandTimeoutMs(takeOwnership), 300_000, 'TPM 1.2 TakeOwnership is long-long');
  t.equal(commandTimeoutMs(tpm12.getRandom(8)), DEFAULT_COMMAND_TIMEOUT_MS);
});

t.test('CommandQueue runs one at a time, in order, past failures', async (t) => {
  const q = new CommandQueue();
  const log: string[] = [];
  let running = 0;
  const job = (name: string, ms: number, fail = false) =>
    q.run(async () => {
      t.equal(running++, 0, `${name} runs alone`);
      log.push(`start ${name}`);
      await new Promise((r) => setTimeout(r, ms));
      log.push(`end ${name}`);
      running--;
      if (fail) throw new Error(name);
      return name;
    });
  const a = job('a', 20);
  const b = job('b', 5, true);
  const c = job('c', 1);
  t.equal(log[0], 'start a', 'a free queue starts at once');
  t.equal(await a, 'a');
  await t.rejects(b, { message: 'b' });
  t.equal(await c, 'c');
  await q.idle();
  t.same(log, ['start a', 'end a', 'start b', 'end b', 'start c', 'end c']);
});
