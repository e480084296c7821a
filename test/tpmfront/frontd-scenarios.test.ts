// tpm0 scenarios through a node served by frontd (the per-host front-end process: a shared
// FUSE thread, its guest's own vtpmd over tpmif).
import t from 'tap';
import { nodeScenarios } from './node-scenarios.ts';

nodeScenarios(t, 'frontd');
