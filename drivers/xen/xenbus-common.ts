// Xenbus: the vtpm device handshake between a front end and a back end, through xenstore.
// This file holds what both sides share (states, paths, the toolstack's retarget); the
// sides are drivers/tpmfront/xenbus-front.ts and drivers/tpmback/xenbus-back.ts, both on
// the XenbusDevice base (xenbus-device.ts).
//
// Paths (as xen-tpmfront / tpmback): front  /local/domain/<front>/device/vtpm/<n>/
//   state, backend, backend-id, ring-ref, event-channel, feature-protocol-v2
// back   /local/domain/<back>/backend/vtpm/<front>/<n>/   state, frontend, frontend-id, uuid
// States: 1 Initialising, 2 InitWait, 3 Initialised, 4 Connected, 5 Closing, 6 Closed.
//
// Back end (e.g. vtpmd):
//   const xb = await XenbusBack.start(domain, { frontId, devid: 0, uuid })  // publishes InitWait
//   xb.onConnect((link) => { ... link.params (TpmifParams for the serving worker: TpmifBack.attach) })
//   xb.onDisconnect(() => stop the serve loop)       // front closed or died; back returns
//                                                      // to InitWait so a front can (re)attach
//   const link = await xb.connected(timeoutMs)
//   await xb.close()                                  // Closing → wait front → unmap/unbind → Closed
// Front end (e.g. the FUSE node):
//   const xf = await XenbusFront.start(domain, { backendId, devid: 0 })  // needs the back's dir
//   const link = await xf.connected(timeoutMs)   // link.params for a worker, link.front (TpmifFront here)
//   xf.onDisconnect(cb)      // back end closed or died: grant ended, port closed; with
//                            // reconnect (default) the front goes back to Initialising and
//                            // redoes the handshake when a back end publishes InitWait again
//   await xf.close()         // Closing → wait back → end grants, close port → Closed
// Who points at whom: each side writes its own pointer keys (`backend`/`backend-id`,
// `frontend`/`frontend-id`) and opens its directory for reading by the peer. A toolstack in
// domain 0 may move a front to a new back end (a restarted vtpmd gets a new domid) with
// `retargetFront(store0, frontId, devid, newBackId)`; the front follows on the next watch.
import type { XenStore } from './xenstore-client.ts';

export const XenbusState = { Unknown: 0, Initialising: 1, InitWait: 2, Initialised: 3, Connected: 4, Closing: 5, Closed: 6 } as const;

export function frontPath(frontId: number, devid: number): string {
  return `/local/domain/${frontId}/device/vtpm/${devid}`;
}
export function backPath(backId: number, frontId: number, devid: number): string {
  return `/local/domain/${backId}/backend/vtpm/${frontId}/${devid}`;
}

/** Domain-0 toolstack: point a front's device at another back end domain. */
export async function retargetFront(store0: XenStore, frontId: number, devid: number, backId: number): Promise<void> {
  const f = frontPath(frontId, devid);
  await store0.transaction(async (tx) => {
    tx.write(`${f}/backend`, backPath(backId, frontId, devid));
    tx.write(`${f}/backend-id`, String(backId));
  });
}
