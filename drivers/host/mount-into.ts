// Bind a guest's node into a container's mount namespace, from the runtime's side (an OCI
// createRuntime hook: the container's namespaces exist, pivot_root has not happened yet).
//
// The node is a FUSE mount that the manager's front end made *after* the runtime created
// the container's mount namespace, and the host's mounts are private: the node is not
// visible in that namespace, and mount(2) refuses a bind whose source lies in another
// namespace. So the kernel's mount API does it in three steps: open_tree(OPEN_TREE_CLONE)
// takes a detached copy of the node's mount here, setns(2) enters the container's mount
// namespace, move_mount(2) attaches the copy over a file made in the container's /dev.
//
// setns(CLONE_NEWNS) is refused to a thread that shares its fs attributes (cwd, root) with
// others, and Node always runs threads: the calling thread first takes a private copy of
// them (unshare(CLONE_FS)), enters the container's namespace, does only synchronous work,
// and goes back to its own namespace (and working directory) before returning. Nothing
// else runs on this thread meanwhile; libuv's threads never leave the host's namespace.
import koffi from 'koffi';
import { closeSync, constants, fstatSync, lstatSync, openSync, statSync } from 'node:fs';
import { dirname } from 'node:path';
import { VtpmError } from '../base/errors.ts';
import { libc, O_CLOEXEC, sysClose, sysError, sysOpen } from '../base/libc.ts';

const CLONE_FS = 0x200;
const CLONE_NEWNS = 0x20000;
const AT_FDCWD = -100;
const OPEN_TREE_CLONE = 1;
const MOVE_MOUNT_F_EMPTY_PATH = 0x4;

// On the one libc binding's handle (drivers/base/libc.ts).
const fns = {
  unshare: libc.func('int unshare(int flags)'),
  setns: libc.func('int setns(int fd, int nstype)'),
  // glibc ≥ 2.36 (Debian 12) wraps both; the syscalls are in Linux ≥ 5.2.
  openTree: libc.func('int open_tree(int dfd, const char *path, unsigned int flags)'),
  moveMount: libc.func('int move_mount(int from_dfd, const char *from_path, int to_dfd, const char *to_path, unsigned int flags)'),
};

export interface Bind {
  /** The node as the host sees it (RUN/NAME/dev/tpm0). */
  source: string;
  /** Where it goes, as the container's mount namespace sees it before pivot_root
   *  (ROOTFS/dev/tpm0). */
  target: string;
}

/** The mount namespace of `pid` as an inode number (to tell two namespaces apart). */
export function mountNsOf(pid: number | 'self'): number {
  return statSync(`/proc/${pid}/ns/mnt`).ino;
}

/** A regular file at `target` for a bind to cover, made without following a symlink the
 *  image may have put there (before pivot_root, a symlink would resolve on the host). */
function bindTarget(target: string): void {
  const dir = lstatSync(dirname(target), { throwIfNoEntry: false });
  if (!dir?.isDirectory()) throw new VtpmError('ENOENT', `${dirname(target)} is not a directory in the container's mount namespace`);
  let fd: number;
  try {
    fd = openSync(target, constants.O_WRONLY | constants.O_CREAT | constants.O_NOFOLLOW | constants.O_NONBLOCK, 0o600);
  } catch (e) {
    throw new VtpmError('EIO', `cannot make ${target} in the container's mount namespace: ${(e as Error).message}`, { cause: e });
  }
  try {
    if (!fstatSync(fd).isFile()) throw new VtpmError('EINVAL', `${target} in the container is not a regular file: refusing to cover it`);
  } finally {
    closeSync(fd);
  }
}

/** Bind each `source` (a path in this process's mount namespace) over its `target` in the
 *  mount namespace of process `pid`. A failure part way leaves the binds made so far in
 *  that namespace: the caller fails the container, and its namespace goes with it. */
export function bindIntoMountNs(pid: number, binds: readonly Bind[]): void {
  const own = sysOpen('/proc/self/ns/mnt', O_CLOEXEC);
  const trees: number[] = [];
  let theirs = -1;
  try {
    theirs = sysOpen(`/proc/${pid}/ns/mnt`, O_CLOEXEC);
    for (const b of binds) {
      const fd = fns.openTree(AT_FDCWD, b.source, OPEN_TREE_CLONE | O_CLOEXEC) as number;
      if (fd < 0) throw sysError(`open_tree ${b.source}`, koffi.errno());
      trees.push(fd);
    }
    if ((fns.unshare(CLONE_FS) as number) < 0) throw sysError('unshare(CLONE_FS)', koffi.errno());
    const cwd = process.cwd();
    if ((fns.setns(theirs, CLONE_NEWNS) as number) < 0) throw sysError(`setns to the mount namespace of pid ${pid}`, koffi.errno());
    try {
      binds.forEach((b, i) => {
        bindTarget(b.target);
        if ((fns.moveMount(trees[i]!, '', AT_FDCWD, b.target, MOVE_MOUNT_F_EMPTY_PATH) as number) < 0) throw sysError(`move_mount ${b.source} onto ${b.target}`, koffi.errno());
      });
    } finally {
      // Back home whatever happened: this thread runs the rest of the program.
      if ((fns.setns(own, CLONE_NEWNS) as number) < 0) throw sysError('setns back to our own mount namespace', koffi.errno());
      process.chdir(cwd);
    }
  } finally {
    for (const fd of trees) sysClose(fd);
    if (theirs >= 0) sysClose(theirs);
    sysClose(own);
  }
}
