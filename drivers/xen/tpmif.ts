// tpmif v2: the vTPM shared-page protocol (Xen include/public/io/tpmif.h), both sides;
// page layout and attachment in tpmif-page.ts.
//
// Page layout (little-endian): u32 length @0, u8 state @4 (0 IDLE, 1 SUBMIT, 2 FINISH,
// 3 CANCEL), u8 locality @5, u8 pad @6, u8 nr_extra_pages @7, u32 extra_pages[] @8, data
// at 8 + 4*nr_extra_pages. The front writes only SUBMIT/CANCEL, the back only IDLE/FINISH.
// This implementation always grants one extra page (nr_extra_pages = 1): data is 4084
// bytes in the first page and continues in the extra page; commands and responses are
// limited to MAX_TPMIF_DATA = 4096 bytes (EOVERSIZE beyond).
//
// Construction from plain, serialisable parameters (what a worker_thread gets):
//   const p: TpmifParams = xenbusFront.params   // or xenbusBack.params, or tpmifParams(...)
//   new Worker(file, { workerData: p })
//   // in the worker:
//   const front = TpmifFront.attach(workerData)   // maps the page(s) and the channel record
//   const rsp = front.sendSync(cmd, locality, timeoutMs)   // blocks on the futex
//   // or, in vtpmd's engine worker:
//   const back = TpmifBack.attach(workerData)
//   back.serveSync((cmd, locality) => engine.process(cmd))  // returns 'stopped' | 'closed'
//   // from any other thread: TpmifBack.stopFrom(p) (or back.stop() from an async caller)
// TpmifParams = { page: GrantParams, extra: GrantParams, evtchn: EvtchnParams } (see
// gnttab.ts / evtchn.ts): file path + byte offset of each page, channel record + side.
//
// Front (tpmif-front.ts): sendSync(cmd, locality, timeoutMs) → response (blocking, no event
// loop), or split as begin(cmd, locality) + finishSync(timeoutMs, spinUs, into) so the
// caller works while the back end runs the command; send(...) → Promise (event-loop form);
// cancel() (any thread, or from the main thread while send() is pending): the back aborts
// if it can; the pending call then gets the response (back finished anyway) or ECANCELED. A second submit while
// one is in flight → EBUSY. Timeout → ETIMEDOUT (the command is cancelled; the page is
// reusable once the back end acknowledges). Channel closed or back end dead → ECLOSED.
// The back end answering IDLE without a cancel (its handler threw) → EIO.
// Back (tpmif-back.ts): serveSync(handler) hands each command to the handler as a view over the shared page
// (a copy only when it spans the extra page) and writes the handler's response back.

export { initTpmifPage, MAX_TPMIF_DATA, tpmifExtraRef, TPMIF_CANCEL, TPMIF_FINISH, TPMIF_IDLE, TPMIF_SUBMIT, type TpmifParams } from './tpmif-page.ts';
export { TpmifFront } from './tpmif-front.ts';
export { TpmifBack, type TpmifHandler } from './tpmif-back.ts';
