import { readFile } from 'node:fs/promises';
import { Value, ValueErrorType } from '@sinclair/typebox/value';
import { parseDocument } from 'yaml';
import { policyShapeProblem } from '../policy/shape.js';
import { POLICY_DEFAULTS, PolicyInput, type PolicyBody, type PolicyInputBody } from '../schemas/policy.js';
import { CliError } from './client.js';

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/** The policies a file names, in file order; empty only when it says `policies: {}` or `policies: []`. */
export type PolicyFile = Map<string, PolicyInputBody>;

function readProblem(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'ENOENT': return 'no such file';
    case 'EISDIR': return 'is a directory, not a policies file';
    case 'EACCES': return 'permission denied';
    default: return `cannot read it: ${err.code ?? err.message}`;
  }
}

/** "… at position 17" from V8's JSON.parse, as a line and column a reader can find. */
function jsonProblem(text: string, err: Error): string {
  const at = /^(.*) in JSON at position (\d+)/.exec(err.message);
  if (!at) return err.message;
  const before = text.slice(0, Number(at[2])).split('\n');
  return `${at[1]} at line ${before.length}, column ${before[before.length - 1].length + 1}`;
}

/**
 * The parsed file. A `.json` file must be JSON: YAML would take comments and bare words in it, and
 * name its mistakes in YAML's terms. It is still read again as YAML, which refuses a key given
 * twice where JSON.parse silently keeps the last one (two policies of one name, one lost).
 */
async function readDocument(file: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new CliError(`${file}: ${readProblem(err as NodeJS.ErrnoException)}`);
  }
  if (!text.trim()) throw new CliError(`${file}: the file is empty; expected a top-level "policies" map or list`);
  const json = /\.json$/i.test(file);
  if (json) {
    try {
      JSON.parse(text);
    } catch (err) {
      throw new CliError(`${file}: not valid JSON: ${jsonProblem(text, err as Error)}`);
    }
  }
  const doc = parseDocument(text, { prettyErrors: true });
  // The first line of yaml's message ends in "at line L, column C:" before a code excerpt.
  const problem = doc.errors[0] ?? doc.warnings[0];
  if (problem) throw new CliError(`${file}: not valid ${json ? 'JSON' : 'YAML'}: ${problem.message.split('\n')[0].replace(/:$/, '')}`);
  return doc.toJS();
}

/**
 * The `policies` entry of a file, as [name, fields] pairs. It must be there and be a map or a
 * list: anything else read as "no policies" would make --prune delete every policy. An explicit
 * empty map or list is the one way to say "no policies".
 */
function policyEntries(file: string, doc: unknown): Array<[string, unknown]> {
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) {
    throw new CliError(`${file}: expected a top-level "policies" map or list`);
  }
  if (!('policies' in doc)) throw new CliError(`${file}: no top-level "policies" key; to mean no policies at all, write "policies: {}"`);
  const list = (doc as { policies: unknown }).policies;
  if (list === null || list === undefined) {
    throw new CliError(`${file}: "policies" has no value; to mean no policies at all, write "policies: {}"`);
  }
  if (Array.isArray(list)) {
    return list.map((p, i) => {
      const name = p !== null && typeof p === 'object' && typeof (p as { name?: unknown }).name === 'string' ? (p as { name: string }).name : null;
      if (name === null) throw new CliError(`${file}: policy #${i + 1}: a list entry must be a map whose "name" is a string`);
      return [name, p];
    });
  }
  if (typeof list !== 'object') throw new CliError(`${file}: "policies" must be a map or a list, not ${JSON.stringify(list)}`);
  return Object.entries(list);
}

/**
 * The first claim pattern YAML read as a boolean or number. Patterns are text, and some issuers
 * send text that looks like other types (GitLab's ref_protected is the string "true"), so an
 * unquoted `ref_protected: true` is an easy slip; the schema alone would only say "Expected union
 * value" about it.
 */
function unquotedPattern(claims: unknown): { claim: string; value: boolean | number } | null {
  if (claims === null || typeof claims !== 'object' || Array.isArray(claims)) return null;
  for (const [claim, patterns] of Object.entries(claims)) {
    for (const value of Array.isArray(patterns) ? patterns : [patterns]) {
      if (typeof value === 'boolean' || typeof value === 'number') return { claim, value };
    }
  }
  return null;
}

/**
 * Reads a policies file: YAML or JSON, either `policies: {name: {...}}` or
 * `policies: [{name, ...}]`. Every problem names the file, and the policy when there is one.
 */
export async function readPolicyFile(file: string): Promise<PolicyFile> {
  const entries = policyEntries(file, await readDocument(file));
  const policies: PolicyFile = new Map();
  for (const [name, raw] of entries) {
    const where = `${file}: policy ${name}`;
    if (!NAME.test(name)) throw new CliError(`${where}: name must match ${NAME}`);
    if (policies.has(name)) throw new CliError(`${where}: defined twice`);
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new CliError(`${where}: expected a map of its fields`);
    const { name: inner, ...input } = raw as Record<string, unknown>;
    // In the map form the key is the name; a different "name" inside would be silently dropped.
    if (inner !== undefined && inner !== name) throw new CliError(`${where}: the key is its name, but its "name" field says ${JSON.stringify(inner)}`);
    // Before the schema: a misspelt field (`claimz`) came back as the one it stood for missing,
    // "/claims Expected required property", which sent people looking for the wrong line.
    const unknown = Object.keys(input).find((key) => !Object.hasOwn(PolicyInput.properties, key));
    if (unknown !== undefined) throw new CliError(`${where}: unknown field ${JSON.stringify(unknown)}; a policy's fields are ${Object.keys(PolicyInput.properties).join(', ')}`);
    const unquoted = unquotedPattern(input.claims);
    if (unquoted) {
      const { claim, value } = unquoted;
      throw new CliError(`${where}: claim ${JSON.stringify(claim)}: the pattern ${value} is a YAML ${typeof value}, but patterns are text: quote it ("${value}")`);
    }
    const error = Value.Errors(PolicyInput, input).First();
    if (error?.type === ValueErrorType.ObjectRequiredProperty) throw new CliError(`${where}: ${error.path.slice(1)} is required`);
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
