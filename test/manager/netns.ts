// Two test hosts' networks: a network namespace per host, each joined to this (the test's)
// namespace by a veth pair and nothing else — no forwarding — so the only way from host A
// to host B is through a relay the test runs here (test/manager/relay.ts): the untrusted
// network between them. Removed on teardown.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import type { Test } from 'tap';

export interface HostNet {
  /** The namespace the host's manager runs in. */
  ns: string;
  /** The host's own address (inside ns). */
  ip: string;
  /** This namespace's address on the link to it. */
  peerIp: string;
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });

export function makeHostNets(t: Test, count: number): HostNet[] {
  const tag = randomBytes(2).toString('hex');
  const subnet = 16 + (parseInt(tag, 16) % 200);
  const nets: HostNet[] = [];
  for (let i = 0; i < count; i++) {
    const ns = `vtpm-${tag}-${i}`;
    const inner = `v${tag}i${i}`;
    const outer = `v${tag}o${i}`;
    const base = `10.${subnet}.${i}`;
    ip('netns', 'add', ns);
    t.teardown(() => {
      try {
        ip('netns', 'del', ns); // takes its end of the veth, and so the pair, with it
      } catch {
        // already gone
      }
    });
    ip('link', 'add', outer, 'type', 'veth', 'peer', 'name', inner, 'netns', ns);
    ip('addr', 'add', `${base}.1/30`, 'dev', outer);
    ip('link', 'set', outer, 'up');
    ip('-n', ns, 'addr', 'add', `${base}.2/30`, 'dev', inner);
    ip('-n', ns, 'link', 'set', inner, 'up');
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    nets.push({ ns, ip: `${base}.2`, peerIp: `${base}.1` });
  }
  return nets;
}
