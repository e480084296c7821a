// Layout of a domain's shared-memory file (DIR/mem/dom<id>, mode 0600, created by the
// authority, 1 MiB sparse). Shared by the library, the authority and worker threads.
//
//   page 0            header: magic, version, domid, pid, process start time; the 2-level
//                     event area (below)
//   pages 1..2        grant table: GNT_ENTRIES entries of 8 bytes (two u32 words)
//   pages 3..18       event-channel records: EVT_RECORDS records of 64 bytes
//   pages 19..        data pages (grantable), DATA_PAGES of them; grant "page" numbers
//                     index this area (page p is at byte (DATA_START + p) * 4096)
//
// Grant entry word 0 (u32, updated only with compare-and-swap, by the granter and by the
// authority): bit 31 in use, bit 28 read-only, bits 16..27 map count, bits 0..15 grantee.
// Word 1: the data page number.
//
// Event-channel record (16 × i32), in the file of the domain that allocated the port
// (record index = that domain's port number):
//   0 state (EVT_FREE, EVT_UNBOUND, EVT_CONNECTED, EVT_CLOSED, EVT_PROXY)
//   1 remote domid   2 remote port   3 released bits (1 = side A released, 2 = side B)
//   4 A pending word (futex)  5 A pid  6 A start time
//   8 B pending word (futex)  9 B pid 10 B start time
//  12 A interrupt request   13 B interrupt request (EvtchnEndpoint.interrupt)
//   7 A mux word   11 B mux word: 0 = the side waits on its own pending word; v + 1 = its
//     events go to vcpu v of its domain's 2-level area (EvtchnMux), as port bit (side A:
//     the record index; side B: the binder's port, word 2) of that domain's file (side A:
//     this file; side B: the file of the remote domid, word 1)
// Side A is the allocating domain, side B the binding one. A PROXY record is the
// binder's own port number pointing at (remote domid, remote port); it holds no words.
// Pending word values: 0 nothing, 1 pending, 2 a waiter sleeps on it, 3 the channel closed.
//
// 2-level event area (Xen's event_2l ABI; i32 indices in page 0): a pending bitmap and a
// mask bitmap of EVT_RECORDS bits, indexed by the domain's port, shared by the domain's
// waiters; and MUX_VCPUS "vcpu" slots, one per EvtchnMux thread, each with its own upcall
// word (futex: 0 nothing, 1 pending, 2 its waiter sleeps) and selector (bit w: pending
// word w may hold news for this vcpu). A slot is claimed by CAS of its owner word and
// holds the owner's pid and start time (a dead owner's slot is taken over).

export const PAGE = 4096;
export const MAGIC = 0x4d44_5856; // 'VXDM'
export const LAYOUT_VERSION = 2;
export const HDR_MAGIC = 0, HDR_VERSION = 1, HDR_DOMID = 2, HDR_PID = 3, HDR_START = 4;
export const GNT_START = 1;
const GNT_PAGES = 2;
export const GNT_ENTRIES = (GNT_PAGES * PAGE) / 8;
const EVT_START = 3;
const EVT_PAGES = 16;
export const EVT_RECORD_BYTES = 64;
export const EVT_RECORDS = (EVT_PAGES * PAGE) / EVT_RECORD_BYTES;
const DATA_START = EVT_START + EVT_PAGES;
export const DATA_PAGES = 251;
const FILE_PAGES = DATA_START + DATA_PAGES;
export const FILE_BYTES = FILE_PAGES * PAGE;

export const GNT_INUSE = 0x8000_0000;
export const GNT_RO = 0x1000_0000;
export const GNT_MAPSHIFT = 16;
export const GNT_MAPMASK = 0x0fff_0000;
export const GNT_DOMMASK = 0xffff;

export const EVT_FREE = 0, EVT_UNBOUND = 1, EVT_CONNECTED = 2, EVT_CLOSED = 3, EVT_PROXY = 4;
export const EW_STATE = 0, EW_RDOM = 1, EW_RPORT = 2, EW_RELEASED = 3;
export const EW_SIDE = [4, 8] as const; // pending word index of side A / side B
export const EW_INTR = 12;
export const EW_PID = 1, EW_START = 2, EW_MUX = 3; // offsets from the side's pending word
export const PEND_NONE = 0, PEND_SET = 1, PEND_SLEEP = 2, PEND_CLOSED = 3;

export const HDR_PENDING = 64; // EVT_RECORDS / 32 words
export const HDR_MASK = HDR_PENDING + EVT_RECORDS / 32;
export const HDR_VCPU = HDR_MASK + EVT_RECORDS / 32;
export const MUX_VCPUS = 32;
export const VCPU_WORDS = 8;
export const V_UPCALL = 0, V_SEL = 1, V_OWNER = 2, V_PID = 3, V_START = 4, V_STOP = 5;
export const UPCALL_NONE = 0, UPCALL_SET = 1, UPCALL_SLEEP = 2;

/** i32 index in page 0 of word `k` of vcpu slot `v`. */
export function vcpuWord(v: number, k: number): number {
  return HDR_VCPU + v * VCPU_WORDS + k;
}

/** Byte offset in the domain file of event-channel record `port`. */
export function evtRecordOffset(port: number): number {
  return EVT_START * PAGE + port * EVT_RECORD_BYTES;
}
/** Byte offset in the domain file of data page `page`. */
export function dataPageOffset(page: number): number {
  return (DATA_START + page) * PAGE;
}
export function memPath(dir: string, domid: number): string {
  return `${dir}/mem/dom${domid}`;
}
export function socketPath(dir: string): string {
  return `${dir}/authority.sock`;
}
