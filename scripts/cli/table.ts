// The CLI's plain-text tables (`--json` gives the same rows to machines).
export function printTable(head: string[], rows: string[][]): void {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  for (const r of [head, ...rows]) console.log(r.map((c, i) => (c ?? '').padEnd(w[i]!)).join('  ').trimEnd());
}
