// The measurement of group-density.test.ts, run as its own process outside the test
// runner's process tracking (tap puts its NODE_OPTIONS import hook into every node child,
// ~45 MB more per process): prints one JSON line with the group process's memory at 0, 1,
// 10 and 50 engines, and how many guests answered afterwards.
import { randomBytes } from 'node:crypto';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { groupFixture, memoryKb, type LocalGuest } from './group-fixture.ts';

const fx = await groupFixture();
try {
  const guests: LocalGuest[] = [];
  const at: Record<string, { pss: number; anon: number }> = { 0: memoryKb(fx.group.pid) };
  for (const target of [1, 10, 50]) {
    while (guests.length < target) {
      const g = await fx.localGuest(`d${guests.length}`);
      tpm2.parseGetRandom(await g.link.front.send(tpm2.getRandom(32)));
      tpm2.parsePcrExtend(await g.link.front.send(tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest: randomBytes(32) }])));
      tpm2.parsePcrRead(await g.link.front.send(tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [16] }])));
      guests.push(g);
    }
    // idle a moment: what is measured is what the engines keep, not a command's garbage
    await new Promise((r) => setTimeout(r, 500));
    at[target] = memoryKb(fx.group.pid);
  }
  let answered = 0;
  for (const g of guests) if (tpm2.parseGetRandom(await g.link.front.send(tpm2.getRandom(8))).length === 8) answered++;
  const listed = (await fx.group.list()).length;
  process.stdout.write(`${JSON.stringify({ at, answered, listed })}\n`);
} finally {
  await fx.done();
}
