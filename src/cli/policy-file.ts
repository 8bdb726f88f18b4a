import { readFile } from 'node:fs/promises';
import { Value } from '@sinclair/typebox/value';
import { parse } from 'yaml';
import { policyShapeProblem } from '../policy/shape.js';
import { POLICY_DEFAULTS, PolicyInput, type PolicyBody, type PolicyInputBody } from '../schemas/policy.js';
import { CliError } from './client.js';

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/**
 * Reads a policies file: YAML or JSON, either `policies: {name: {...}}` or
 * `policies: [{name, ...}]`. Every problem names the file and the policy.
 */
export async function readPolicyFile(file: string): Promise<Map<string, PolicyInputBody>> {
  let doc: unknown;
  try {
    doc = parse(await readFile(file, 'utf8'));
  } catch (err) {
    throw new CliError(`${file}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : `not valid YAML: ${(err as Error).message.split('\n')[0]}`}`);
  }
  const list = (doc as { policies?: unknown } | null)?.policies;
  const entries: Array<[string, unknown]> = Array.isArray(list)
    ? list.map((p, i) => [typeof p?.name === 'string' ? p.name : `#${i + 1}`, p])
    : list && typeof list === 'object' ? Object.entries(list) : [];
  if (!list) throw new CliError(`${file}: expected a top-level "policies" map or list`);
  const policies = new Map<string, PolicyInputBody>();
  for (const [name, raw] of entries) {
    const where = `${file}: policy ${name}`;
    if (!NAME.test(name)) throw new CliError(`${where}: name must match ${NAME}`);
    if (policies.has(name)) throw new CliError(`${where}: defined twice`);
    const { name: _ignored, ...input } = (raw ?? {}) as Record<string, unknown>;
    const error = Value.Errors(PolicyInput, input).First();
    if (error) throw new CliError(`${where}: ${error.path || 'policy'} ${error.message}`);
    const p = input as PolicyInputBody;
    const problem = policyShapeProblem(p);
    if (problem) throw new CliError(`${where}: ${problem}`);
    policies.set(name, p);
  }
  return policies;
}

const FIELDS = ['description', 'issuer', 'audience', 'claims', 'grant_role', 'database', 'default_ttl', 'max_ttl', 'max_active_leases', 'connection_limit', 'assume_role', 'enabled'] as const;

/** The stored shape of an input, defaults applied, for comparing with what the broker holds. */
export function normalise(input: PolicyInputBody | PolicyBody): Record<string, unknown> {
  const full = { ...POLICY_DEFAULTS, audience: null, ...input } as Record<string, unknown>;
  return Object.fromEntries(FIELDS.map((f) => [f, full[f] ?? null]));
}

function canonical(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`;
  if (value && typeof value === 'object') {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canonical((value as Record<string, unknown>)[k])}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

export interface PolicyPlan {
  create: string[];
  update: Array<{ name: string; fields: string[] }>;
  delete: string[];
  unchanged: string[];
}

export function planPolicies(wanted: Map<string, PolicyInputBody>, current: PolicyBody[], prune: boolean): PolicyPlan {
  const plan: PolicyPlan = { create: [], update: [], delete: [], unchanged: [] };
  const existing = new Map(current.map((p) => [p.name, p]));
  for (const [name, input] of wanted) {
    const have = existing.get(name);
    if (!have) {
      plan.create.push(name);
      continue;
    }
    const a = normalise(input);
    const b = normalise(have);
    const fields = FIELDS.filter((f) => canonical(a[f]) !== canonical(b[f]));
    if (fields.length) plan.update.push({ name, fields });
    else plan.unchanged.push(name);
  }
  if (prune) for (const name of existing.keys()) if (!wanted.has(name)) plan.delete.push(name);
  return plan;
}
