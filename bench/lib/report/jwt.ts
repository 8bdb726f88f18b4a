import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { table } from './markdown.js';

/** JWT verification: RS256 vs ES256 through the full request path. */
export function renderJwt(r: Results): string[] {
  const out: string[] = [];
  out.push('## JWT verification: RS256 vs ES256 through the full request path');
  out.push('');
  if (r.jwt) {
    out.push('`POST /policies/evaluate` (verifies the token, reads the issuer\'s enabled policies, evaluates them) with distinct pre-signed tokens, 16 connections. CPU is the broker process\'s milliseconds per request.');
    out.push('');
    out.push(table(['alg', 'req/s', 'p50 ms', 'p99 ms', 'errors', 'broker CPU ms/req', 'PostgreSQL CPU ms/req'], r.jwt.map((j) => [j.alg, fmt(j.run.rps, 0), fmt(j.run.latency.p50, 2), fmt(j.run.latency.p99, 2), String(j.run.errors), fmt(j.cpu.broker, 3), fmt(j.cpu.pg, 3)])));
  } else out.push('Not measured (see failed scenarios).');
  out.push('');
  return out;
}
