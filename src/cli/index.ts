import { Command, CommanderError } from 'commander';
import { ConfigError, loadConfig } from '../config.js';
import { createLogger } from '../logger.js';
import { migrate } from '../postgres/migrate.js';
import { serve } from '../server.js';

export function buildCli(): Command {
  const program = new Command('pg-broker')
    .description('Trade a verified OIDC token for a short-lived PostgreSQL login')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride();

  program
    .command('serve', { isDefault: true })
    .description('run the HTTP service (applies pending migrations first)')
    .addHelpText('after', '\nExample:\n  DATABASE_URL=postgres://broker@db/broker BROKER_ISSUERS=https://token.actions.githubusercontent.com \\\n  BROKER_AUDIENCE=pg-broker pg-broker serve')
    .action(async () => serve(loadConfig()));

  program
    .command('migrate')
    .description('apply pending migrations and create the marker role, then exit')
    .addHelpText('after', '\nExample:\n  DATABASE_URL=postgres://broker@db/broker pg-broker migrate')
    .action(async () => {
      const url = process.env.DATABASE_URL?.trim();
      if (!url) throw new ConfigError('DATABASE_URL', 'is required');
      const managed = process.env.BROKER_MANAGED_ROLE?.trim() || 'credential_broker_managed';
      const logger = createLogger(process.env.LOG_LEVEL?.trim() || 'info');
      const { applied } = await migrate(url, managed, logger);
      console.log(applied.length ? `applied ${applied.join(', ')}` : 'database is up to date');
    });

  program
    .command('demo')
    .description('walk through issue, login, denial, renew and revoke against an embedded PostgreSQL')
    .addHelpText('after', '\nExample:\n  npm run demo')
    .action(async () => {
      const { runDemo } = await import('./demo.js');
      process.exitCode = (await runDemo()) ? 0 : 1;
    });

  return program;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildCli().parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      process.exitCode = err.exitCode;
      return;
    }
    const message = err instanceof ConfigError ? `configuration error: ${err.message}` : `error: ${(err as Error).message}`;
    console.error(`pg-broker: ${message}`);
    process.exitCode = 1;
  }
}

if (import.meta.url === `file://${process.argv[1]}` || process.argv[1]?.endsWith('/src/cli/index.ts')) {
  await main(process.argv);
}
