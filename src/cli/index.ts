import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { ConfigError, databaseUrlFrom, loadConfig, logLevelFrom, managedRoleFrom } from '../config.js';
import { createLogger } from '../logger.js';
import { CliError } from './client.js';
import { addAdminCommands } from './admin-commands.js';
import { example, withClientOptions } from './command-options.js';
import { ExecCommand } from './exec-args.js';
import { FORMATS } from './formats.js';

function positiveInt(value: string): number {
  if (!/^\d+$/.test(value) || Number(value) < 1) throw new InvalidArgumentError('must be a whole number of seconds ≥ 1');
  return Number(value);
}

function port(value: string): number {
  if (!/^\d+$/.test(value) || Number(value) > 65535) throw new InvalidArgumentError('must be a port number');
  return Number(value);
}

/**
 * An empty value is refused, never read as "not given": `-o "$UNSET"` would print the password to
 * stdout, `--token "$UNSET"` fall back to another token (perhaps another identity's), and
 * `--subject ""` next to `--policy` widen a revocation. One check over every option and argument
 * of the command about to run, so a new option cannot miss it.
 */
function refuseEmptyValues(cmd: Command): void {
  for (const option of cmd.options) {
    const value: unknown = cmd.getOptionValue(option.attributeName());
    if (typeof value === 'string' && !value.trim()) cmd.error(`error: option '${option.flags}' is empty (an unset variable?)`);
  }
  cmd.registeredArguments.forEach((argument, i) => {
    // Of a variadic argument (exec's command) only the first word must be something: the command.
    const value: unknown = cmd.processedArgs[i];
    const first = Array.isArray(value) ? value[0] : value;
    if (typeof first === 'string' && !first.trim()) cmd.error(`error: argument '${argument.name()}' is empty (an unset variable?)`);
  });
}

/** An option exec does not know, given before the command, was most likely meant for the command. */
function execOptionHint(text: string): string {
  const unknown = /^error: unknown option '([^']+)'/.exec(text);
  if (!unknown) return text;
  return `${text.trimEnd()}\n(options for the command go after it, best after --: pg-broker exec [options] -- COMMAND ${unknown[1]} …)\n`;
}

export function buildCli(): Command {
  const program = new Command('pg-broker')
    // Needed for exec's passThroughOptions: options are read per command, not across the line.
    .enablePositionalOptions()
    .description('Trade a verified OIDC token for a short-lived PostgreSQL login')
    .showHelpAfterError('(add --help for usage)')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) })
    .hook('preAction', (_program, command) => refuseEmptyValues(command));

  program
    .command('serve')
    .description('run the HTTP service (applies pending migrations first); configured by environment variables; what a bare pg-broker runs')
    .addHelpText('after', example('DATABASE_URL=postgres://credential_broker@db/broker \\\n  BROKER_ISSUERS=https://token.actions.githubusercontent.com BROKER_AUDIENCE=pg-broker pg-broker serve'))
    .action(async () => {
      const { serve } = await import('../server.js');
      await serve(loadConfig());
    });

  program
    .command('migrate')
    .description('apply pending migrations, record which BROKER_MANAGED_ROLE this database\'s broker schema belongs to (the first one to migrate it; any other is refused), create that marker role and, on PostgreSQL 16+, its creator roles, then exit')
    .addHelpText('after', example('DATABASE_URL=postgres://credential_broker@db/broker BROKER_MANAGED_ROLE=team_a_managed pg-broker migrate'))
    .action(async () => {
      const databaseUrl = databaseUrlFrom(process.env);
      const managedRole = managedRoleFrom(process.env);
      // As serve does it (without waiting for the server): a failure to connect or log in names DATABASE_URL.
      const { migrateWhenReachable } = await import('../server.js');
      const logger = createLogger(logLevelFrom(process.env, 'warn'));
      const applied = await migrateWhenReachable({ databaseUrl, managedRole }, logger, false);
      console.log(applied.length ? `applied ${applied.join(', ')}` : 'database is up to date');
    });

  program
    .command('dev')
    .description('embedded PostgreSQL + a DEVELOPMENT-ONLY token issuer + the broker, seeded and ready to try')
    .option('--dir <path>', 'where the embedded PostgreSQL keeps its data', '.pg-broker')
    .option('--port <port>', 'broker port', port, 8080)
    .option('--pg-port <port>', 'PostgreSQL port', port, 54320)
    .option('--issuer-port <port>', 'dev issuer port', port, 8081)
    .addHelpText('after', example('pg-broker dev\npg-broker dev --port 9090 --dir /tmp/broker-dev'))
    .action(async (opts) => {
      const { devCommand } = await import('./dev.js');
      await devCommand(opts);
    });

  program
    .command('dev-issuer')
    .description('only the DEVELOPMENT-ONLY token issuer (signs any claims it is asked for; never expose it)')
    .option('--host <host>', 'listen address', '127.0.0.1')
    .option('--port <port>', 'listen port', port, 9000)
    .option('--public-url <url>', 'issuer URL as clients reach it (the iss claim)')
    .addHelpText('after', example("pg-broker dev-issuer --port 9000\ncurl -X POST http://127.0.0.1:9000/token -d '{\"sub\":\"dev:alice\"}'"))
    .action(async (opts) => {
      const { devIssuerCommand } = await import('./dev.js');
      await devIssuerCommand(opts);
    });

  program
    .command('demo')
    .description('walk through issue, login, denial, renew and revoke against a throwaway embedded PostgreSQL')
    .addHelpText('after', example('npm run demo'))
    .action(async () => {
      const { runDemo } = await import('./demo.js');
      if (!(await runDemo())) throw new CliError('the demo did not behave as expected');
    });

  withClientOptions(program.command('creds'))
    .description('fetch a credential and print it (or write it, mode 0600, with --output)')
    .option('--policy <name>', 'policy to use when several admit the token')
    .option('--ttl <seconds>', 'lease duration', positiveInt)
    .addOption(new Option('--format <format>', 'output format').choices([...FORMATS]).default('env'))
    .option('-o, --output <file>', 'write to this file (mode 0600) instead of stdout; replaces the whole file')
    .addHelpText('after', example('eval "$(pg-broker creds --format env)"\n'
      + '# -o replaces the whole file: give the pgpass line a file of its own, not ~/.pgpass\n'
      + 'pg-broker creds --format pgpass -o ./broker.pgpass\n'
      + 'PGPASSFILE=./broker.pgpass psql -h HOST -p PORT -U USER DATABASE   # the fields of that line\n'
      + 'pg-broker creds --token-file /var/run/secrets/tokens/pg-broker --format dotenv -o /credentials/db.env'))
    .action(async (opts) => {
      const { credsCommand } = await import('./credentials.js');
      await credsCommand(opts);
    });

  // Its own class: it reads the words after 'exec' before commander does (see exec-args.ts).
  const exec = new ExecCommand('exec').copyInheritedSettings(program);
  program.addCommand(exec);
  withClientOptions(exec)
    .description('run a command with PG* variables and DATABASE_URL set; renew while it runs; revoke when it exits')
    .option('--policy <name>', 'policy to use when several admit the token')
    .option('--ttl <seconds>', 'lease duration and renewal step (default: the policy\'s default_ttl)', positiveInt)
    .option('--keep', 'do not revoke the lease when the command exits')
    .argument('<command...>', 'the command to run, best after --; everything from its first word on is its own, but without -- one of exec\'s options after it is refused')
    // From the command's first word on, every word is the command's, as with env, sudo or
    // docker run: read as exec's own, `exec psql -h db …` printed exec's help and exited 0 without
    // running psql, and `exec psql -Atc …` failed on an unknown option. One of exec's own options
    // there, without --, is refused instead (ExecCommand): scripts once meant it for exec.
    .passThroughOptions()
    .configureOutput({ outputError: (text, write) => write(execOptionHint(text)) })
    .addHelpText('after', example("pg-broker exec --policy ci-migrate -- npm run migrate\npg-broker exec -- psql -Atc 'select current_user'"))
    .action(async (command: string[], opts) => {
      const { execCommand } = await import('./credentials.js');
      process.exitCode = await execCommand(command, opts);
    });

  addAdminCommands(program);

  return program;
}

export async function main(argv: string[]): Promise<void> {
  // A bare `pg-broker` serves, as it always has. serve is not commander's default command: that
  // would pass a mistyped subcommand to serve as an argument, and report "too many arguments for
  // 'serve'" instead of the unknown command and the one meant.
  const args = argv.length > 2 ? argv : [...argv, 'serve'];
  // `pg-broker … | head -1`: the reader went away. Without a listener the write's EPIPE is thrown
  // as an uncaught exception, stack trace and all, skipping every command's clean-up (dev's and
  // demo's PostgreSQL). With it, output that nobody reads is dropped and the command finishes as
  // it would have; `creds`, whose output is the credential, sees its own write fail and revokes it.
  // Any other failure it reports (a full disk under `> file`, where not even the first write fits)
  // fails the command, without cutting short its clean-up either. A write to a file cut short
  // part-way is reported by no one here: Node's file stream takes the short count for success.
  // `creds` and the admin listings check every byte themselves (writeWholly, printLines).
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') return;
    if (process.exitCode === undefined || process.exitCode === 0) process.exitCode = 1;
    process.stderr.write(`pg-broker: cannot write to standard output: ${err.code ?? err.message}\n`);
  });
  // Nor may stderr failing too (both on a full disk, `> log 2>&1`) crash the command mid-way.
  process.stderr.on('error', () => undefined);
  try {
    await buildCli().parseAsync(args);
  } catch (err) {
    if (err instanceof CommanderError) {
      process.exitCode = err.exitCode;
      return;
    }
    const message = err instanceof ConfigError ? `configuration error: ${err.message}` : (err as Error).message;
    console.error(`pg-broker: ${message}`);
    process.exitCode = err instanceof CliError ? err.exitCode : 1;
  }
}

if (process.argv[1]?.endsWith('/src/cli/index.ts')) {
  await main(process.argv);
}
