// tpmrm0 scenarios through the raw FUSE front end, with a libtpms engine in its worker, and
// again with the same engine behind the split (begin/finish) form vtpmd's tpmif backend has,
// so a tpm0 command can be in flight when a tpmrm0 command arrives.
import t from 'tap';
import { rmScenarios } from './rm-scenarios.ts';
import { splitEngineBackendSpec } from './split-engine-backend.ts';

t.test('engine backend', async (t) => rmScenarios(t, 'raw'));
t.test('split backend (tpm0 WRITE answered before its response)', async (t) => rmScenarios(t, 'raw', splitEngineBackendSpec()));
