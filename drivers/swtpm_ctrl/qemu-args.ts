// The QEMU arguments that attach a guest to a control socket served here (QEMU connects
// to it, hands over the data channel with SET_DATAFD, and speaks the control protocol).
export type TpmDevice = 'tpm-tis' | 'tpm-crb';

/** QEMU option values escape a comma by doubling it. */
const q = (s: string) => s.replace(/,/g, ',,');

export function qemuTpmArgs(opts: { ctrlPath: string; id?: string; device?: TpmDevice }): string[] {
  const id = opts.id ?? 'tpm0';
  return ['-chardev', `socket,id=chr${id},path=${q(opts.ctrlPath)}`, '-tpmdev', `emulator,id=${id},chardev=chr${id}`, '-device', `${opts.device ?? 'tpm-tis'},tpmdev=${id}`];
}
