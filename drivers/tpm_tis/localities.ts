// Locality arbitration of the TIS interface (the ACCESS register of each locality): one
// active locality, requests queued by bit, seize only from below, relinquish hands the TPM
// to the highest pending request. The register file is told when the active locality
// loses the TPM (its command is aborted) and when a locality is granted (an interrupt).
import { ACCESS, LOCALITIES } from './regs.ts';

export interface LocalityEvents {
  /** The active locality loses the TPM: drop its command or response. */
  lost(): void;
  /** `loc` became the active locality. */
  granted(loc: number): void;
}

export class Localities {
  /** Active locality, -1 when none. */
  active = -1;
  private pending = 0; // bit per locality with requestUse outstanding
  private seized = 0; // bit per locality whose use was seized

  constructor(private readonly events: LocalityEvents) {}

  /** The ACCESS register as locality `loc` reads it. */
  access(loc: number): number {
    let v = ACCESS.tpmRegValidSts | ACCESS.tpmEstablishment;
    if (this.active === loc) v |= ACCESS.activeLocality;
    if (this.seized & (1 << loc)) v |= ACCESS.beenSeized;
    if (this.pending & (1 << loc)) v |= ACCESS.requestUse;
    if (this.pending & ~(1 << loc)) v |= ACCESS.pendingRequest;
    return v;
  }

  /** A write of `v` to locality `loc`'s ACCESS register. */
  write(loc: number, v: number): void {
    const bit = 1 << loc;
    if (v & ACCESS.beenSeized) this.seized &= ~bit;
    if (v & ACCESS.seize) {
      if (this.active < 0) this.grant(loc);
      else if (loc > this.active) {
        // Only a higher locality may seize; the loser learns it from beenSeized.
        this.seized |= 1 << this.active;
        this.events.lost();
        this.grant(loc);
      }
    }
    if (v & ACCESS.requestUse) {
      if (this.active < 0) this.grant(loc);
      else if (this.active !== loc) this.pending |= bit;
    }
    if (v & ACCESS.activeLocality) {
      if (this.active === loc) {
        this.events.lost();
        this.active = -1;
        for (let l = LOCALITIES - 1; l >= 0; l--) {
          if (this.pending & (1 << l)) {
            this.grant(l);
            break;
          }
        }
      } else {
        this.pending &= ~bit; // withdraw a request not yet granted
      }
    }
  }

  private grant(loc: number): void {
    this.active = loc;
    this.pending &= ~(1 << loc);
    this.events.granted(loc);
  }
}
