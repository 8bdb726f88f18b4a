/** Summaries of a V8 .cpuprofile: self time by function and by package, for the report. */
import fs from 'node:fs';
import { SourceMap } from 'node:module';
import { fileURLToPath } from 'node:url';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber?: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  hitCount?: number;
  children?: number[];
}
export interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

export interface ProfileRow {
  name: string;
  ms: number;
  share: number;
}

export interface ProfileSummary {
  totalMs: number;
  byFunction: ProfileRow[];
  byPackage: ProfileRow[];
}

/** Which package or layer a frame belongs to: `fastify`, `pg`, `node:internal`, `src/leases`, `(gc)`... */
export function packageOf(frame: CallFrame): string {
  const { url, functionName } = frame;
  if (!url) {
    if (functionName === '(garbage collector)') return '(gc)';
    if (functionName === '(idle)') return '(idle)';
    if (functionName === '(program)') return '(program)';
    return functionName.startsWith('(') ? functionName : '(native)';
  }
  const nm = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  // Nested node_modules: report the innermost package.
  const all = [...url.matchAll(/node_modules\/((?:@[^/]+\/)?[^/]+)/g)];
  if (nm) return all[all.length - 1][1];
  if (url.startsWith('node:')) return 'node:' + (url.slice(5).split('/')[0] === 'internal' ? 'internal' : url.slice(5).split('/')[0]);
  const src = /\/(src|bench|test)\/([^/]+)/.exec(url);
  if (src) return `${src[1]}/${src[2].replace(/\.ts$/, '')}`;
  return url.split('/').slice(-2).join('/');
}

function shortUrl(url: string): string {
  if (!url) return '';
  const nm = [...url.matchAll(/node_modules\/((?:@[^/]+\/)?[^/]+)\/(.*)$/g)];
  if (nm.length) return `${nm[nm.length - 1][1]}/${nm[nm.length - 1][2].split('/').slice(-1)[0]}`;
  const src = /\/((?:src|bench|test)\/.*)$/.exec(url);
  if (src) return src[1];
  return url.replace(/^file:\/\//, '').split('/').slice(-2).join('/');
}

/**
 * Points frames in compiled bundles back at their TypeScript sources, through the source map
 * beside each bundle, so the summary (and a saved .cpuprofile) names src/leases/issue.ts rather
 * than a chunk file. Frames without a map, or outside any mapped range, stay as they are.
 */
export function mapToSources(profile: CpuProfile): void {
  const maps = new Map<string, SourceMap | null>();
  const mapOf = (url: string) => {
    if (!maps.has(url)) {
      try {
        maps.set(url, new SourceMap(JSON.parse(fs.readFileSync(`${fileURLToPath(url)}.map`, 'utf8'))));
      } catch {
        maps.set(url, null);
      }
    }
    return maps.get(url);
  };
  for (const { callFrame: f } of profile.nodes) {
    if (!f.url.startsWith('file:') || f.url.includes('/node_modules/')) continue;
    const entry = mapOf(f.url)?.findEntry(f.lineNumber, f.columnNumber ?? 0);
    if (!entry || !('originalSource' in entry)) continue;
    // Map sources are relative to the map file, which sits beside the bundle.
    f.url = new URL(entry.originalSource, f.url).href;
    f.lineNumber = entry.originalLine;
    f.columnNumber = entry.originalColumn;
  }
}

export function summarizeProfile(profile: CpuProfile, top = 15): ProfileSummary {
  const selfUs = new Map<number, number>();
  if (profile.samples && profile.timeDeltas) {
    for (let i = 0; i < profile.samples.length; i++) {
      const id = profile.samples[i];
      selfUs.set(id, (selfUs.get(id) ?? 0) + Math.max(0, profile.timeDeltas[i] ?? 0));
    }
  } else {
    const total = profile.endTime - profile.startTime;
    const hits = profile.nodes.reduce((s, n) => s + (n.hitCount ?? 0), 0) || 1;
    for (const n of profile.nodes) selfUs.set(n.id, ((n.hitCount ?? 0) / hits) * total);
  }
  // The profiler's own work (Profiler.stop serialising the profile) is not the broker's.
  const excluded = new Set<number>();
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const exclude = (id: number) => {
    excluded.add(id);
    for (const c of byId.get(id)?.children ?? []) exclude(c);
  };
  for (const n of profile.nodes) if (n.callFrame.url === 'node:inspector' && !excluded.has(n.id)) exclude(n.id);
  const byFn = new Map<string, number>();
  const byPkg = new Map<string, number>();
  let totalUs = 0;
  for (const node of profile.nodes) {
    const us = selfUs.get(node.id) ?? 0;
    if (!us || excluded.has(node.id)) continue;
    totalUs += us;
    const f = node.callFrame;
    const fnKey = f.url ? `${f.functionName || '(anonymous)'} ${shortUrl(f.url)}:${f.lineNumber + 1}` : f.functionName;
    byFn.set(fnKey, (byFn.get(fnKey) ?? 0) + us);
    const pkg = packageOf(f);
    byPkg.set(pkg, (byPkg.get(pkg) ?? 0) + us);
  }
  const rows = (m: Map<string, number>) =>
    [...m.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([name, us]) => ({ name, ms: us / 1000, share: totalUs ? us / totalUs : 0 }));
  return { totalMs: totalUs / 1000, byFunction: rows(byFn), byPackage: rows(byPkg) };
}
