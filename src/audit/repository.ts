import type { AuditType } from '../schemas/audit.js';
import type { Queryable } from '../postgres/pool.js';
import { decodeCursor, encodeCursor, isoRow, jsonbText } from '../postgres/rows.js';
import type { AuditEventBody, AuditQueryBody } from '../schemas/audit.js';

export interface AuditEvent {
  type: AuditType;
  issuer?: string | null;
  subject?: string | null;
  /** False when iss/sub were read from a token that failed verification. */
  actor_verified?: boolean;
  lease_id?: string | null;
  policy?: string | null;
  username?: string | null;
  reason?: string | null;
  request_id?: string | null;
  client_ip?: string | null;
  detail?: Record<string, unknown> | null;
}

const INSERT_COLUMNS = ['type', 'issuer', 'subject', 'actor_verified', 'lease_id', 'policy', 'username', 'reason', 'request_id', 'client_ip', 'detail'] as const;

// PostgreSQL text cannot hold NUL; an attacker-chosen claim must not make the audit write fail.
function clean(value: unknown): unknown {
  return typeof value === 'string' ? value.replace(/\0/g, '\uFFFD').slice(0, 4096) : value;
}

/** The event as stored: defaults filled in, strings made storable. */
export function auditRecord(event: AuditEvent): Record<(typeof INSERT_COLUMNS)[number], unknown> {
  const record = {} as Record<(typeof INSERT_COLUMNS)[number], unknown>;
  for (const c of INSERT_COLUMNS) {
    if (c === 'actor_verified') record[c] = event.actor_verified ?? true;
    else if (c === 'detail') record[c] = event.detail ? jsonbText(event.detail) : null;
    else record[c] = clean(event[c] ?? null);
  }
  return record;
}

export function auditParams(event: AuditEvent): unknown[] {
  const record = auditRecord(event);
  return INSERT_COLUMNS.map((c) => record[c]);
}

/**
 * SQL inserting every event of a jsonb array parameter ($n), for one round trip per batch.
 * `where` (a condition on the events, alias `e`) lets a caller record only the events whose
 * state change really happened in the same statement. `join` adds a row source to read from
 * (`from`, e.g. a CTE's RETURNING) and the `detail` expression that uses it, so an event can carry
 * what that statement decided (an attempt count, a retry time) rather than what the caller guessed.
 */
export function insertAuditFromJson(param: number, where?: string, join?: { from: string; detail: string }): string {
  const select = INSERT_COLUMNS.map((c) => (c === 'detail' && join ? `${join.detail} AS detail` : `e.${c}`));
  return `INSERT INTO broker.audit_events (${INSERT_COLUMNS.join(', ')})
    SELECT ${select.join(', ')} FROM jsonb_to_recordset($${param}::jsonb) AS e(type text, issuer text, subject text,
      actor_verified boolean, lease_id uuid, policy text, username text, reason text, request_id text, client_ip text, detail jsonb)
      ${join ? `CROSS JOIN ${join.from}` : ''}
    ${where ? `WHERE ${where}` : ''}`;
}

export function auditJson(events: AuditEvent[]): string {
  return JSON.stringify(events.map((e) => {
    const record = auditRecord(e);
    return { ...record, detail: record.detail ? JSON.parse(record.detail as string) : null };
  }));
}

export async function recordAudit(db: Queryable, event: AuditEvent): Promise<void> {
  await db.query(
    `INSERT INTO broker.audit_events (${INSERT_COLUMNS.join(', ')}) VALUES (${INSERT_COLUMNS.map((_, i) => `$${i + 1}`).join(', ')})`,
    auditParams(event),
  );
}

export async function listAudit(db: Queryable, q: AuditQueryBody): Promise<{ items: AuditEventBody[]; next_cursor: string | null }> {
  const limit = q.limit ?? 100;
  const after = q.cursor ? decodeCursor(q.cursor, 1) : null;
  if (q.cursor && !(after && /^[1-9]\d{0,18}$/.test(String(after[0])))) throw new Error('INVALID_CURSOR');
  const where: string[] = [];
  const params: unknown[] = [];
  const add = (sql: string, value: unknown) => {
    params.push(value);
    where.push(sql.replace('?', `$${params.length}`));
  };
  if (q.subject !== undefined) add('subject = ?', q.subject);
  if (q.issuer !== undefined) add('issuer = ?', q.issuer);
  if (q.policy !== undefined) add('policy = ?', q.policy);
  if (q.type !== undefined) add('type = ?', q.type);
  if (q.lease_id !== undefined) add('lease_id = ?', q.lease_id);
  if (q.owner !== undefined || q.owner_issuer !== undefined) {
    const of: string[] = [];
    for (const [column, value] of [['subject', q.owner], ['issuer', q.owner_issuer]] as const) {
      if (value === undefined) continue;
      params.push(value);
      of.push(`l.${column} = $${params.length}`);
    }
    where.push(`lease_id IN (SELECT l.id FROM broker.leases l WHERE ${of.join(' AND ')})`);
  }
  if (q.username !== undefined) add('username = ?', q.username);
  if (q.since !== undefined) add('at >= ?', q.since);
  if (q.until !== undefined) add('at < ?', q.until);
  if (after) add('e.id < ?', after[0]);
  params.push(limit + 1);
  const { rows } = await db.query(
    // Sort on the bigint column: an unqualified `id` here would mean the text alias, whose
    // order ('999' > '1000') disagrees with the `id < cursor` filter and loses whole pages.
    `SELECT e.id::text AS id, at, type, issuer, subject, actor_verified, lease_id, policy, username, reason, request_id, client_ip, detail
       FROM broker.audit_events e ${where.length ? 'WHERE ' + where.join(' AND ') : ''}
      ORDER BY e.id DESC LIMIT $${params.length}`,
    params,
  );
  const items = rows.slice(0, limit).map((r) => isoRow<AuditEventBody>(r));
  return { items, next_cursor: rows.length > limit ? encodeCursor([items[items.length - 1].id as string]) : null };
}
