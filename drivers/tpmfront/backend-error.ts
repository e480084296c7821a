// A failure below tpm0 (vtpmd gone, a timeout) reaches the client as EIO; its cause goes
// to the front end's log once per distinct cause, since a dead backend fails every command.
import { describeError } from '../base/errors.ts';

export function backendErrorReporter(log: (line: string) => void = (l) => console.error(l)): (e: unknown) => void {
  let last = '';
  return (e) => {
    const line = `tpm0: backend failed, the client gets EIO: ${describeError(e)}`;
    if (line !== last) log((last = line));
  };
}
