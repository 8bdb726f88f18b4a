import type { Command } from 'commander';
import type { AuditEventBody } from '../schemas/audit.js';
import type { LeaseBody } from '../schemas/lease.js';
import type { PolicyBody } from '../schemas/policy.js';
import { brokerUrl, callBroker, CliError, REVOKE_TIMEOUT_MS } from './client.js';
import { obtainToken, type TokenOptions } from './token.js';
import { AUDIT_FILTERS, LEASE_FILTERS } from './filters.js';
import { cell, printListing, type ListingOptions } from './listing.js';
import { printLines } from './output.js';
import { maxWaitSeconds, RateLimitPacer } from './rate-limit.js';

export interface AdminOptions extends TokenOptions {
  url?: string;
}

export async function session(opts: AdminOptions): Promise<{ base: string; token: string }> {
  return { base: brokerUrl(opts.url), token: await obtainToken(opts) };
}

/** Every policy, page by page, waiting out the broker's rate limit as a listing's --all does. */
export async function allPolicies(base: string, token: string): Promise<PolicyBody[]> {
  const pacer = new RateLimitPacer(maxWaitSeconds());
  const out: PolicyBody[] = [];
  let cursor: string | null = null;
  do {
    const query: string = cursor ? `?limit=1000&cursor=${encodeURIComponent(cursor)}` : '?limit=1000';
    const body: { items: PolicyBody[]; next_cursor: string | null } = await pacer.get(base, token, `/policies${query}`);
    out.push(...body.items);
    cursor = body.next_cursor;
  } while (cursor);
  return out;
}

export async function policyList(opts: AdminOptions & { json?: boolean }): Promise<void> {
  const { base, token } = await session(opts);
  const policies = await allPolicies(base, token);
  await printLines(opts.json ? [JSON.stringify(policies, null, 2)] : policies.map(policyRow));
}

function policyRow(p: PolicyBody): string {
  return `${p.name}\t${p.enabled ? 'enabled' : 'disabled'}\t${p.grant_role}@${p.database}\tttl ${p.default_ttl}/${p.max_ttl}s\t${JSON.stringify(p.claims)}`;
}

/** `policy get NAME`: the policy as the broker holds it, as JSON. */
export async function policyGet(name: string, opts: AdminOptions): Promise<void> {
  const { base, token } = await session(opts);
  const { body } = await callBroker<PolicyBody>(base, token, 'GET', `/policies/${encodeURIComponent(name)}`);
  await printLines([JSON.stringify(body, null, 2)]);
}

/**
 * `policy delete NAME`. The broker answers a deletion with nothing, so the policy is read first:
 * what was deleted is printed (all of it with --json), to check, or to put it back.
 */
export async function policyDelete(name: string, opts: AdminOptions & { json?: boolean }): Promise<void> {
  const { base, token } = await session(opts);
  const path = `/policies/${encodeURIComponent(name)}`;
  const { body: policy } = await callBroker<PolicyBody>(base, token, 'GET', path);
  await callBroker(base, token, 'DELETE', path);
  try {
    await printLines([opts.json ? JSON.stringify(policy, null, 2) : `deleted ${policyRow(policy)}`]);
  } catch (err) {
    // The policy is gone by now: what it was must not be lost with the output (a full disk).
    process.stderr.write(`pg-broker: policy ${name} is deleted; it was:\n${JSON.stringify(policy, null, 2)}\n`);
    throw err;
  }
  // Deleting a policy ends no lease: said, since the admin may expect it to.
  process.stderr.write(`leases issued under ${name} run until they end; to end them now: pg-broker leases revoke --policy ${name}\n`);
}

/**
 * `policy evaluate`: which policies admit my token, and the first claim that fails for the others.
 * True when one of them would issue: admitting is not enough when its group or database is broken.
 */
export async function policyEvaluate(opts: AdminOptions & { json?: boolean }): Promise<boolean> {
  const { base, token } = await session(opts);
  const { body } = await callBroker<{ issuer: string; subject: string; policies: Array<{ name: string; admitted: boolean; reason?: string; cannot_issue?: string; failed_claims: Array<{ claim: string; patterns: string[]; value: unknown }> }> }>(base, token, 'POST', '/policies/evaluate');
  const lines = [];
  if (opts.json) {
    lines.push(JSON.stringify(body, null, 2));
  } else {
    lines.push(`token: iss ${body.issuer}, sub ${body.subject}`);
    if (body.policies.length === 0) lines.push('no policy names this issuer');
    for (const p of body.policies) {
      const first = p.failed_claims[0];
      const why = p.reason ?? (first ? `claim ${first.claim} is ${first.value === null || first.value === undefined ? 'missing (or null)' : JSON.stringify(first.value)}, wants ${first.patterns.map((x) => JSON.stringify(x)).join(' or ')}` : '');
      if (p.admitted && p.cannot_issue) lines.push(`! admitted ${p.name}, but issues nothing now: ${p.cannot_issue}`);
      else lines.push(`${p.admitted ? '✓ admitted' : '✗ denied  '} ${p.name}${why ? `: ${why}` : ''}`);
    }
  }
  await printLines(lines);
  return body.policies.some((p) => p.admitted && !p.cannot_issue);
}

export async function leasesList(cmd: Command, opts: AdminOptions & ListingOptions): Promise<void> {
  const { base, token } = await session(opts);
  await printListing<LeaseBody>(cmd, LEASE_FILTERS, base, token, '/leases', opts,
    (l) => [l.id, l.state, l.username, l.policy, l.subject, `expires ${l.expires_at}`].map(cell).join('\t'), 'leases');
}

/** `audit`: the broker's audit events, newest first, as rows, one JSON page or document, or NDJSON. */
export async function auditList(cmd: Command, opts: AdminOptions & ListingOptions): Promise<void> {
  const { base, token } = await session(opts);
  await printListing<AuditEventBody>(cmd, AUDIT_FILTERS, base, token, '/audit', opts,
    // A rejected token's iss/sub are whatever its sender wrote: marked, as the API marks them
    // (actor_verified), or anyone could put rows under an admin's name in this view.
    (e) => [e.at, e.type, e.subject !== null && !e.actor_verified ? `${e.subject} (unverified)` : e.subject, e.lease_id, e.policy, e.reason].map(cell).join('\t'),
    'audit events');
}

export async function leasesRevoke(opts: AdminOptions & { id?: string; subject?: string; issuer?: string; policy?: string; reason?: string }): Promise<void> {
  // An id revokes that one lease and the broker takes nothing else with it: filters given
  // alongside would be dropped while the user believes they applied. Refused before any call.
  const filters = (['subject', 'issuer', 'policy'] as const).filter((f) => opts[f] !== undefined).map((f) => `--${f}`);
  if (opts.id !== undefined && filters.length) {
    throw new CliError(`give a lease id or ${filters.join(' and ')}, not both: an id revokes that one lease, whatever the filters say`);
  }
  if (opts.id === undefined && !filters.length) throw new CliError('name a lease id, or --subject, --issuer or --policy');
  const { base, token } = await session(opts);
  if (opts.id !== undefined) {
    const query = opts.reason === undefined ? '' : `?reason=${encodeURIComponent(opts.reason)}`;
    const { body } = await callBroker<LeaseBody>(base, token, 'DELETE', `/leases/${encodeURIComponent(opts.id)}${query}`, undefined, REVOKE_TIMEOUT_MS);
    await printLines([`lease ${body.id}: ${body.state}`]);
    return;
  }
  const { body } = await callBroker<{ revoked: number; lease_ids: string[] }>(base, token, 'POST', '/leases/revoke', {
    subject: opts.subject, issuer: opts.issuer, policy: opts.policy, reason: opts.reason,
  }, REVOKE_TIMEOUT_MS);
  await printLines([`revoked ${body.revoked} lease(s)${body.lease_ids.length ? `: ${body.lease_ids.join(', ')}` : ''}`]);
}
