import { allPolicies, session, type AdminOptions } from './admin.js';
import { callBroker, CliError } from './client.js';
import { planPolicies, readPolicyFile, type PolicyPlan } from './policy-file.js';

export interface PolicyApplyOptions extends AdminOptions {
  file: string;
  prune?: boolean;
  dryRun?: boolean;
}

interface Outcome {
  failed: string[];
  counts: Record<'created' | 'updated' | 'deleted' | 'unchanged', number>;
}

/** "PUT /policies/x failed with 400 INVALID_POLICY: …" → "400 INVALID_POLICY: …": the line already names the policy. */
function reason(err: unknown, method: string, path: string): string {
  const message = (err as Error).message;
  const prefix = `${method} ${path} failed with `;
  return message.startsWith(prefix) ? message.slice(prefix.length) : message;
}

/**
 * `policy apply -f FILE [--prune] [--dry-run]`: make the broker's policies match the file. Every
 * policy is tried, and its line is printed once the broker has answered, so the output is what
 * happened rather than what was meant to; any failure makes the exit code non-zero.
 */
export async function policyApply(opts: PolicyApplyOptions): Promise<void> {
  const wanted = await readPolicyFile(opts.file);
  const { base, token } = await session(opts);
  const plan = planPolicies(wanted, await allPolicies(base, token), opts.prune ?? false);
  if (opts.dryRun) return printDryRun([...wanted.keys()], plan);

  const outcome: Outcome = { failed: [], counts: { created: 0, updated: 0, deleted: 0, unchanged: 0 } };
  const unchanged = new Set(plan.unchanged);
  const updates = new Map(plan.update.map((u) => [u.name, u.fields]));
  // After a call the broker never answered, the rest would each wait out the same timeout.
  let unanswered = false;
  for (const [name, input] of wanted) {
    if (unchanged.has(name)) {
      outcome.counts.unchanged += 1;
      console.log(`= unchanged ${name}`);
      continue;
    }
    const fields = updates.get(name);
    const verb = fields ? 'update' : 'create';
    if (unanswered) {
      outcome.failed.push(name);
      console.log(`✗ not tried: ${verb} ${name} (the broker did not answer an earlier call)`);
      continue;
    }
    const path = `/policies/${encodeURIComponent(name)}`;
    try {
      // PUT creates or replaces: its status says which happened, whatever the plan expected.
      const { status, body } = await callBroker<{ warnings?: string[] }>(base, token, 'PUT', path, input);
      const created = status === 201;
      outcome.counts[created ? 'created' : 'updated'] += 1;
      console.log(created ? `+ created ${name}` : `~ updated ${name}${fields ? ` (${fields.join(', ')})` : ''}`);
      // Stored all the same: on stderr, so the per-policy lines on stdout keep their shape.
      for (const warning of body?.warnings ?? []) console.error(`pg-broker: warning: policy ${name}: ${warning}`);
    } catch (err) {
      outcome.failed.push(name);
      console.log(`✗ FAILED to ${verb} ${name}: ${reason(err, 'PUT', path)}`);
      unanswered = (err as CliError).status === undefined;
    }
  }
  // Pruning after a failure would delete policies while some meant to replace them are missing.
  const pruneWithheld = plan.delete.length > 0 && outcome.failed.length > 0;
  if (pruneWithheld) {
    console.log(`! not pruned because of the failures above; kept: ${plan.delete.join(', ')}`);
  } else {
    for (const name of plan.delete) {
      if (unanswered) {
        outcome.failed.push(name);
        console.log(`✗ not tried: delete ${name} (the broker did not answer an earlier call)`);
        continue;
      }
      const path = `/policies/${encodeURIComponent(name)}`;
      try {
        await callBroker(base, token, 'DELETE', path);
        outcome.counts.deleted += 1;
        console.log(`- deleted ${name}`);
      } catch (err) {
        outcome.failed.push(name);
        console.log(`✗ FAILED to delete ${name}: ${reason(err, 'DELETE', path)}`);
        unanswered = (err as CliError).status === undefined;
      }
    }
  }
  const { counts, failed } = outcome;
  const changed = counts.created + counts.updated + counts.deleted;
  console.log(changed === 0 && failed.length === 0
    ? `no changes (${counts.unchanged} unchanged)`
    : `${failed.length ? 'applied in part' : 'applied'}: ${counts.created} created, ${counts.updated} updated, ${counts.deleted} deleted, ${counts.unchanged} unchanged${failed.length ? `, ${failed.length} FAILED` : ''}`);
  if (failed.length) {
    throw new CliError(`${opts.file}: ${failed.length} ${failed.length === 1 ? 'policy' : 'policies'} failed (${failed.join(', ')})${pruneWithheld ? '; nothing was pruned' : ''}`);
  }
}

/**
 * The lines a real apply would print, in its order (the file's, then the deletions), with the
 * verbs of what would be done; an unchanged policy is listed as apply lists it, so the dry run
 * accounts for every policy in the file.
 */
function printDryRun(names: string[], plan: PolicyPlan): void {
  const created = new Set(plan.create);
  const updates = new Map(plan.update.map((u) => [u.name, u.fields]));
  const lines = names.map((name) => {
    if (created.has(name)) return `+ create ${name}`;
    const fields = updates.get(name);
    return fields ? `~ update ${name} (${fields.join(', ')})` : `= unchanged ${name}`;
  });
  lines.push(...plan.delete.map((n) => `- delete ${n}`));
  const unchanged = plan.unchanged.length;
  if (plan.create.length + plan.update.length + plan.delete.length === 0) {
    lines.push(`no changes (${unchanged} unchanged; dry run: nothing applied)`);
  } else {
    // The broker's own checks run only on a real PUT: a dry run must not read as if they passed.
    lines.push(`(dry run: nothing applied; ${plan.create.length} to create, ${plan.update.length} to update, ${plan.delete.length} to delete, ${unchanged} unchanged. `
      + 'Only the file was checked: whether the issuer is allowed, grant_role is a safe group and the database exists is checked by the broker when applying, so apply may still refuse some.)');
  }
  console.log(lines.join('\n'));
}
