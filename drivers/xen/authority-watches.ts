// The authority's xenstore watches, indexed by path. A change at /a/b/c fires the watches
// on /a/b/c, /a/b, /a and / (a special @path, only its own), so the authority looks up the
// path's ancestors instead of testing every watch of every connection: O(depth), not
// O(watches), however many domains (each with its devices' watches) the host runs.

/** Watches by path: peer → its tokens on that path. */
export class WatchIndex<P> {
  private readonly byPath = new Map<string, Map<P, Set<string>>>();

  add(peer: P, path: string, token: string): void {
    let peers = this.byPath.get(path);
    if (!peers) this.byPath.set(path, (peers = new Map()));
    let tokens = peers.get(peer);
    if (!tokens) peers.set(peer, (tokens = new Set()));
    tokens.add(token);
  }

  remove(peer: P, path: string, token: string): void {
    const peers = this.byPath.get(path);
    const tokens = peers?.get(peer);
    if (!peers || !tokens) return;
    tokens.delete(token);
    if (tokens.size === 0) peers.delete(peer);
    if (peers.size === 0) this.byPath.delete(path);
  }

  /** Every watch on `path` and on each of its ancestors, as (peer, tokens). */
  forChange(path: string, each: (peer: P, tokens: Set<string>) => void): void {
    const at = (p: string) => this.byPath.get(p)?.forEach((tokens, peer) => each(peer, tokens));
    if (path.startsWith('@')) return at(path);
    for (let p = path; ; p = p.lastIndexOf('/') > 0 ? p.slice(0, p.lastIndexOf('/')) : '/') {
      at(p);
      if (p === '/') return;
    }
  }
}
