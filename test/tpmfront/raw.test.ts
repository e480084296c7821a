// tpm0 scenarios through the raw FUSE front end (worker thread on /dev/fuse).
import t from 'tap';
import { nodeScenarios } from './node-scenarios.ts';

nodeScenarios(t, 'raw');
