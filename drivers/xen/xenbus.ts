// Xenbus: the vtpm device handshake between a front end and a back end, through xenstore.
//
// Paths (as xen-tpmfront / tpmback): front  /local/domain/<front>/device/vtpm/<n>/
//   state, backend, backend-id, ring-ref, event-channel, feature-protocol-v2
// back   /local/domain/<back>/backend/vtpm/<front>/<n>/   state, frontend, frontend-id, uuid
// States: 1 Initialising, 2 InitWait, 3 Initialised, 4 Connected, 5 Closing, 6 Closed.
//
// Back end (e.g. vtpmd):
//   const xb = await XenbusBack.start(domain, { frontId, devid: 0, uuid })  // publishes InitWait
//   xb.onConnect((link) => { ... link.params (TpmifParams for a worker), link.back (TpmifBack) })
//   xb.onDisconnect(() => stop the serve loop)       // front closed or died; back returns
//                                                      // to InitWait so a front can (re)attach
//   const link = await xb.connected(timeoutMs)
//   await xb.close()                                  // Closing → wait front → unmap/unbind → Closed
// Front end (e.g. the FUSE node):
//   const xf = await XenbusFront.start(domain, { backendId, devid: 0 })  // needs the back's dir
//   const link = await xf.connected(timeoutMs)   // link.params for a worker, link.front (TpmifFront)
//   xf.onDisconnect(cb)      // back end closed or died: grant ended, port closed; with
//                            // reconnect (default) the front goes back to Initialising and
//                            // redoes the handshake when a back end publishes InitWait again
//   await xf.close()         // Closing → wait back → end grants, close port → Closed
// Who points at whom: each side writes its own pointer keys (`backend`/`backend-id`,
// `frontend`/`frontend-id`) and opens its directory for reading by the peer. A toolstack in
// domain 0 may move a front to a new back end (a restarted vtpmd gets a new domid) with
// `retargetFront(store0, frontId, devid, newBackId)`; the front follows on the next watch.

export { backPath, frontPath, retargetFront, XenbusState } from './xenbus-common.ts';
export { XenbusFront, type FrontLink } from './xenbus-front.ts';
export { XenbusBack, type BackLink } from './xenbus-back.ts';
