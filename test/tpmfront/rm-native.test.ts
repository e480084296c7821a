// tpmrm0 scenarios through the fuse-native front end (the backend and its resource manager
// in an RmThread worker).
import t from 'tap';
import { rmScenarios } from './rm-scenarios.ts';

rmScenarios(t, 'native');
