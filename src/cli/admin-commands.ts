import { Option, type Command } from 'commander';
import { example, withClientOptions } from './command-options.js';
import { AUDIT_FILTERS, LEASE_FILTERS } from './filters.js';
import { addListingOptions } from './listing.js';

/** The admin views and changes: `policy …`, `leases …` and `audit`. */
export function addAdminCommands(program: Command): void {
  const policy = program.command('policy').description('manage and explain policies');
  withClientOptions(policy.command('apply'))
    .description('create and update policies from a YAML/JSON file')
    .requiredOption('-f, --file <file>', 'policies file')
    .option('--prune', 'delete policies that are not in the file')
    .option('--dry-run', 'print what apply would do, policy by policy (unchanged ones too), without applying it; checks the file, not the broker\'s own rules (issuer allowed, grant_role safe, database exists)')
    .addHelpText('after', example('pg-broker policy apply -f policies.yaml --dry-run\npg-broker policy apply -f policies.yaml --prune')
      + '\nEvery policy in the file is tried, and each line says what the broker answered. When any fails, the exit\n'
      + 'code is 1 and --prune deletes nothing. A file must name its policies: "policies: {}" is the one way to\n'
      + 'say none (with --prune: delete every policy).\n')
    .action(async (opts) => (await import('./policy-apply.js')).policyApply(opts));
  withClientOptions(policy.command('list'))
    .description('list policies (admin)')
    .option('--json', 'JSON output')
    .addHelpText('after', example('pg-broker policy list --json'))
    .action(async (opts) => (await import('./admin.js')).policyList(opts));
  withClientOptions(policy.command('get'))
    .description('print one policy as JSON (admin)')
    .argument('<name>', 'policy name')
    .addHelpText('after', example('pg-broker policy get ci-migrate'))
    .action(async (name: string, opts) => (await import('./admin.js')).policyGet(name, opts));
  withClientOptions(policy.command('delete'))
    .description('delete one policy and print what it was (admin); its leases run until they end')
    .argument('<name>', 'policy name')
    .option('--json', 'print the deleted policy as JSON')
    .addHelpText('after', example('pg-broker policy delete ci-migrate\npg-broker policy delete ci-migrate --json > ci-migrate.deleted.json')
      + '\nLeases issued under the policy are not revoked; pg-broker leases revoke --policy NAME ends them.\n')
    .action(async (name: string, opts) => (await import('./admin.js')).policyDelete(name, opts));
  withClientOptions(policy.command('evaluate'))
    .description('explain which policies admit your token, and the first claim that fails for the others')
    .option('--json', 'JSON output')
    .addHelpText('after', example('pg-broker policy evaluate --token-file token.jwt'))
    .action(async (opts) => {
      if (!(await (await import('./admin.js')).policyEvaluate(opts))) process.exitCode = 2;
    });

  const leases = program.command('leases').description('list and revoke leases: your own, or every one with an admin token');
  addListingOptions(withClientOptions(leases.command('list')), LEASE_FILTERS)
    .description('list leases (your own; all of them with an admin token)')
    .addHelpText('after', example('pg-broker leases list --state active\n'
      + 'pg-broker leases list --subject repo:octo-org/octo-repo:ref:refs/heads/main --json\n'
      + 'pg-broker leases list --state active --all --json > leases.json')
      + '\nWhen there are more, the command for the next page goes to stderr; --all follows them all.\n')
    .action(async (opts, cmd: Command) => (await import('./admin.js')).leasesList(cmd, opts));
  withClientOptions(leases.command('revoke'))
    .description('revoke one lease now (your own, or any with an admin token), or every active lease of a subject/issuer/policy (admin)')
    .argument('[id]', 'lease id')
    .option('--subject <sub>', 'every active lease issued to this token subject (admin)')
    .option('--issuer <iss>', 'every active lease issued to tokens of this issuer (admin)')
    .option('--policy <name>', 'every active lease issued under this policy (admin)')
    .option('--reason <text>', "why, kept as the lease's end_reason and in its audit event")
    .addHelpText('after', example('pg-broker leases revoke 5f0c… --reason "password pasted in a ticket"\npg-broker leases revoke --subject user:alice@example.com --reason "left the company"'))
    .action(async (id: string | undefined, opts) => (await import('./admin.js')).leasesRevoke({ ...opts, id }));

  addListingOptions(withClientOptions(program.command('audit')), AUDIT_FILTERS)
    .description('list audit events, newest first (admin): who was issued, renewed, revoked, denied what, and policy changes')
    .addOption(new Option('--ndjson', 'one JSON event per line, for exports').conflicts('json'))
    .addHelpText('after', example('pg-broker audit --since 2026-01-01T00:00:00Z --type credential.issued\n'
      + 'pg-broker audit --lease-id 5f0c… --json\n'
      + 'pg-broker audit --owner user:alice@example.com\n'
      + 'pg-broker audit --since 2026-01-01T00:00:00Z --until 2026-04-01T00:00:00Z --all --ndjson > audit-q1.ndjson')
      + '\nRows are: at, type, subject, lease_id, policy, reason (- for none), tab-separated. When there are\n'
      + 'more, the command for the next page goes to stderr; --all follows them all.\n')
    .action(async (opts, cmd: Command) => (await import('./admin.js')).auditList(cmd, opts));
}
