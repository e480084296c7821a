// tpm0 scenarios through the fuse-native front end.
import t from 'tap';
import { nodeScenarios } from './node-scenarios.ts';

nodeScenarios(t, 'native');
