import { spawn } from 'node:child_process';
import { writeFile, chmod } from 'node:fs/promises';
import { constants } from 'node:os';
import type { CredentialBody, LeaseBody } from '../schemas/lease.js';
import { brokerUrl, callBroker, CliError, obtainToken, type TokenOptions } from './client.js';
import { formatCredential, FORMATS, pgEnvironment, type Format } from './formats.js';

export interface RequestOptions extends TokenOptions {
  url?: string;
  policy?: string;
  ttl?: number;
}

export async function requestCredential(opts: RequestOptions): Promise<{ credential: CredentialBody; base: string; token: string }> {
  const token = await obtainToken(opts);
  const base = brokerUrl(opts.url);
  const body: Record<string, unknown> = {};
  if (opts.policy) body.policy = opts.policy;
  if (opts.ttl !== undefined) body.ttl = opts.ttl;
  const { body: credential } = await callBroker<CredentialBody>(base, token, 'POST', '/credentials', body);
  return { credential, base, token };
}

/** `pg-broker creds`: print a credential, or write it to a file only its owner can read. */
export async function credsCommand(opts: RequestOptions & { format: string; output?: string }): Promise<void> {
  if (!FORMATS.includes(opts.format as Format)) throw new CliError(`--format must be one of ${FORMATS.join(', ')}`);
  const { credential } = await requestCredential(opts);
  const text = formatCredential(credential, opts.format as Format);
  if (!opts.output) {
    process.stdout.write(text);
    return;
  }
  await writeFile(opts.output, text, { mode: 0o600 });
  // writeFile keeps the mode of a file that already existed; tighten it explicitly.
  await chmod(opts.output, 0o600);
  process.stderr.write(`wrote ${opts.format} credential to ${opts.output} (lease ${credential.lease_id}, expires ${credential.expires_at})\n`);
}

const FORWARDED_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2'];

/**
 * `pg-broker exec -- cmd args…`: run a command with a fresh credential in its environment, keep
 * the lease renewed while it runs, and revoke it when the command exits (unless --keep), so a CI
 * job's database access ends with the job.
 */
export async function execCommand(command: string[], opts: RequestOptions & { keep?: boolean }): Promise<number> {
  if (command.length === 0) throw new CliError('nothing to run: pg-broker exec [options] -- command [args…]');
  const { credential, base } = await requestCredential(opts);
  let expiresAt = credential.expires_at;
  const maxExpiresAt = credential.max_expires_at;
  const ttl = opts.ttl ?? Math.max(1, Math.round((Date.parse(credential.expires_at) - Date.now()) / 1000));

  const child = spawn(command[0], command.slice(1), { stdio: 'inherit', env: { ...process.env, ...pgEnvironment(credential), PG_BROKER_LEASE_ID: credential.lease_id } });
  const forward = (signal: NodeJS.Signals) => () => child.kill(signal);
  const handlers = FORWARDED_SIGNALS.map((s) => [s, forward(s)] as const);
  for (const [s, h] of handlers) process.on(s, h);

  // Renew at two thirds of the remaining lifetime, with a fresh token each time (CI tokens are short-lived).
  let timer: NodeJS.Timeout | undefined;
  const scheduleRenew = () => {
    if (expiresAt >= maxExpiresAt) return;
    const delay = Math.max(1000, ((Date.parse(expiresAt) - Date.now()) * 2) / 3);
    timer = setTimeout(async () => {
      try {
        const token = await obtainToken(opts);
        const { body } = await callBroker<LeaseBody>(base, token, 'POST', `/leases/${credential.lease_id}/renew`, { ttl });
        expiresAt = body.expires_at;
        scheduleRenew();
      } catch (err) {
        process.stderr.write(`pg-broker exec: could not renew lease ${credential.lease_id}: ${(err as Error).message}\n`);
      }
    }, delay);
    timer.unref();
  };
  scheduleRenew();

  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
    child.once('error', (err) => reject(new CliError(`cannot run ${command[0]}: ${err.message}`, 127)));
    child.once('exit', (c, s) => resolve([c, s]));
  }).finally(() => {
    clearTimeout(timer);
    for (const [s, h] of handlers) process.removeListener(s, h);
  }).catch(async (err) => {
    if (!opts.keep) await revoke(base, opts, credential.lease_id);
    throw err;
  });
  if (!opts.keep) await revoke(base, opts, credential.lease_id);
  return code ?? 128 + (signal ? (constants.signals[signal] ?? 0) : 0);
}

async function revoke(base: string, opts: TokenOptions, leaseId: string): Promise<void> {
  try {
    const token = await obtainToken(opts);
    await callBroker(base, token, 'DELETE', `/leases/${leaseId}`);
  } catch (err) {
    process.stderr.write(`pg-broker exec: could not revoke lease ${leaseId}; it ends at its expiry: ${(err as Error).message}\n`);
  }
}
