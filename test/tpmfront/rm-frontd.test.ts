// tpmrm0 scenarios through a node served by frontd (its vtpmd is a split backend: a tpm0
// command can be in flight when a tpmrm0 command arrives).
import t from 'tap';
import { rmScenarios } from './rm-scenarios.ts';

rmScenarios(t, 'frontd');
