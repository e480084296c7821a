// `vtpm engine ...`: placeholder group filled in by the engine work (see vtpmd/engine.ts).
import type { Command } from 'commander';
export function registerEngine(_program: Command): void {}
