// When a waiter may spin. Spinning for a peer that is running on another core saves a
// futex sleep and wake-up (tens of µs on this kind of VM); on a host whose cores are all
// busy it only takes CPU from other guests (10 guests on 2 cores: ~10% fewer commands/s).
// The signal is the waiting thread's own preemptions per command (re-checked every `window`
// commands: one getrusage call). Spinning itself gets a spinner preempted now and then, so
// the two thresholds differ: measured on 2 cores, one guest spinning 0.25, ten guests not
// spinning 0.26, ten spinning 0.56, one not spinning 0.04. Spinning stops above 0.4 and
// resumes below 0.15: ten busy guests settle on sleeping, a lone guest on spinning.
//   const gov = new SpinGovernor(50);  ...  TpmifFront.attach(p, { spinUs: () => gov.next() })
import { threadPreemptions } from '../base/libc.ts';

export class SpinGovernor {
  private count = 0;
  private lastPreemptions = threadPreemptions();
  private current: number;

  constructor(
    private readonly maxUs: number,
    private readonly window = 256,
    private readonly stopAbove = 0.4,
    private readonly resumeBelow = 0.15,
  ) {
    this.current = maxUs;
  }

  /** The spin allowance for the next wait, µs (0: sleep at once). */
  next(): number {
    if (++this.count >= this.window) {
      const p = threadPreemptions();
      const rate = (p - this.lastPreemptions) / this.count;
      if (this.current > 0 && rate > this.stopAbove) this.current = 0;
      else if (this.current === 0 && rate < this.resumeBelow) this.current = this.maxUs;
      this.lastPreemptions = p;
      this.count = 0;
    }
    return this.current;
  }
}
