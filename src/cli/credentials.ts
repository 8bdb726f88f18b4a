import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fstatSync, statSync } from 'node:fs';
import { open, rename, unlink } from 'node:fs/promises';
import { constants } from 'node:os';
import path from 'node:path';
import type { CredentialBody, LeaseBody } from '../schemas/lease.js';
import { brokerUrl, callBroker, CliError, REVOKE_TIMEOUT_MS } from './client.js';
import { obtainToken, type TokenOptions } from './token.js';
import { formatCredential, FORMATS, pgEnvironment, type Format } from './formats.js';
import { writeWholly } from './output.js';
import { isFinalRenewFailure, renewDelayMs, type ServerClockReading } from './renew-schedule.js';

export interface RequestOptions extends TokenOptions {
  url?: string;
  policy?: string;
  ttl?: number;
}

/** What a credential must carry before the CLI hands it on (to a file, a command's environment). */
export function missingCredentialFields(body: unknown): string[] {
  const c = (body && typeof body === 'object' ? body : {}) as Record<string, unknown>;
  const strings = ['lease_id', 'username', 'password', 'host', 'database', 'expires_at', 'uri'].filter((k) => typeof c[k] !== 'string' || c[k] === '');
  return Number.isInteger(c.port) ? strings : [...strings, 'port'];
}

export async function requestCredential(opts: RequestOptions): Promise<Awaited<ReturnType<typeof issueWith>>> {
  // The URL is checked before a token is asked for (of GitHub Actions, say) that would go nowhere.
  const base = brokerUrl(opts.url);
  return issueWith(await obtainToken(opts), base, opts);
}

/** How the broker tells an API client to choose among several admitting policies. */
const REQUEST_BODY_ADVICE = /name one in the request body\.?$/;

async function issueWith(token: string, base: string, opts: RequestOptions): Promise<{ credential: CredentialBody; base: string; token: string; serverClock: ServerClockReading | null }> {
  const body: Record<string, unknown> = {};
  if (opts.policy) body.policy = opts.policy;
  if (opts.ttl !== undefined) body.ttl = opts.ttl;
  try {
    const { status, body: credential, serverClock } = await callBroker<CredentialBody>(base, token, 'POST', '/credentials', body);
    const missing = missingCredentialFields(credential);
    if (missing.length) {
      throw new CliError(`the server at ${base} answered POST /credentials with ${status} but not with a credential (no valid ${missing.join(', ')}); is ${base} the broker's URL?`);
    }
    return { credential, base, token, serverClock };
  } catch (err) {
    // The broker's detail names its API; someone at this prompt wants the command.
    if (err instanceof CliError && err.code === 'NO_POLICY') {
      throw new CliError(`${err.message}; with the CLI: pg-broker policy evaluate (with the same token and broker)`, err.exitCode, err.status, err.code);
    }
    // The broker's text lists the policies that admit the token; that part is kept.
    if (err instanceof CliError && err.code === 'AMBIGUOUS_POLICY') {
      const advice = 'pass --policy NAME to choose one';
      const message = REQUEST_BODY_ADVICE.test(err.message) ? err.message.replace(REQUEST_BODY_ADVICE, advice) : `${err.message}; ${advice}`;
      throw new CliError(message, err.exitCode, err.status, err.code);
    }
    throw err;
  }
}

const LEASE_ID_NOTICE_FORMATS = new Set<string>(['uri', 'pgpass', 'json']);

function leaseNotice(leaseId: string, expiresAt: string): string {
  return `lease ${leaseId}, expires ${expiresAt}`;
}

/** `pg-broker creds`: print a credential, or write it to a file only its owner can read. */
export async function credsCommand(opts: RequestOptions & { format: string; output?: string }): Promise<void> {
  if (!FORMATS.includes(opts.format as Format)) throw new CliError(`--format must be one of ${FORMATS.join(', ')}`);
  // Standard output closed (`>&-`, which Node reopens as /dev/null) or /dev/null itself: the
  // credential would go nowhere and stay valid until it expires. Refused before it is issued.
  if (!opts.output && writesNowhere()) {
    throw new CliError('standard output goes nowhere (closed, or /dev/null): the credential would be lost while it stays valid; write it to a file with --output, or read it from a pipe');
  }
  const { credential, base, token } = await requestCredential(opts);
  const text = formatCredential(credential, opts.format as Format);
  if (!opts.output) {
    try {
      await writeWholly(text);
    } catch (err) {
      const reason = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
      const revoked = await revoke(base, { token }, credential.lease_id, 'creds');
      throw new CliError(`cannot write the credential to standard output: ${reason}${revoked ? `; lease ${credential.lease_id} revoked` : ''}`);
    }
    // These formats carry no lease id (json does, but is mostly read for one field): without it
    // the lease can be renewed or revoked only after finding it with leases list.
    if (LEASE_ID_NOTICE_FORMATS.has(opts.format)) process.stderr.write(`pg-broker creds: ${leaseNotice(credential.lease_id, credential.expires_at)}\n`);
    return;
  }
  try {
    await writeSecretFile(opts.output, text);
  } catch (err) {
    // A credential nobody received would stay valid until it expires: end it now. The error names
    // the path the user gave; the temporary file beside it is ours.
    const reason = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
    const revoked = await revoke(base, { token }, credential.lease_id, 'creds');
    throw new CliError(`cannot write ${opts.output}: ${reason}${revoked ? `; lease ${credential.lease_id} revoked` : ''}`);
  }
  process.stderr.write(`wrote ${opts.format} credential to ${opts.output} (lease ${credential.lease_id}, expires ${credential.expires_at})\n`);
}

function writesNowhere(): boolean {
  try {
    const out = fstatSync(1);
    const nul = statSync('/dev/null');
    return out.isCharacterDevice() && out.rdev === nul.rdev;
  } catch {
    return false;
  }
}

/**
 * Puts `text` at `file` readable by its owner only. Writing into `file` itself would expose the
 * secret under an existing file's old mode until a chmod, and would follow a symlink planted at
 * that path to wherever it points. So the secret goes into a new file created 0600 and exclusively
 * ('wx' never opens something already there), which then replaces `file` by rename: rename swaps
 * the directory entry, so a symlink at `file` is replaced itself, never followed.
 */
export async function writeSecretFile(file: string, text: string): Promise<void> {
  const temp = path.join(path.dirname(file), `.${path.basename(file)}.${randomBytes(6).toString('hex')}.tmp`);
  const handle = await open(temp, 'wx', 0o600);
  try {
    try {
      await handle.writeFile(text);
    } finally {
      await handle.close();
    }
    await rename(temp, file);
  } catch (err) {
    await unlink(temp).catch(() => undefined);
    throw err;
  }
}

/** The signals exec handles while its command runs, rather than dying of them and leaving the lease. */
export const EXEC_SIGNALS: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2'];

/**
 * Which of EXEC_SIGNALS exec passes on to its command. At a terminal, Ctrl-C and Ctrl-\ go to the
 * whole foreground process group, the command included: a copy from exec would make a second
 * one, and tools such as terraform abort hard on a second SIGINT. Elsewhere (a CI runner,
 * `kill -INT <pid>`) only exec gets them, so it must pass them on. The rest come from `kill` and
 * reach exec alone either way.
 */
export function signalsToForward(stdinIsTTY: boolean): NodeJS.Signals[] {
  return EXEC_SIGNALS.filter((s) => !(stdinIsTTY && (s === 'SIGINT' || s === 'SIGQUIT')));
}

/**
 * `pg-broker exec -- cmd args…`: run a command with a fresh credential in its environment, keep
 * the lease renewed while it runs, and revoke it when the command exits (unless --keep), so a CI
 * job's database access ends with the job.
 */
export async function execCommand(command: string[], opts: RequestOptions & { keep?: boolean }): Promise<number> {
  if (command.length === 0) throw new CliError('nothing to run: pg-broker exec [options] -- command [args…]');
  // A signal while the credential is being issued means: do not start the command. Dying of it
  // would leave the credential, issued a moment later, valid until it expires; so it is revoked
  // once it arrives (unless --keep). A second signal leaves at once.
  let early = null as NodeJS.Signals | null;
  const onEarly = (signal: NodeJS.Signals) => () => {
    if (early) process.exit(128 + (constants.signals[signal] ?? 0));
    early = signal;
    process.stderr.write(`pg-broker exec: ${signal}: the command will not start${opts.keep ? '' : '; a credential being issued is revoked once it arrives'}\n`);
  };
  const earlyHandlers = EXEC_SIGNALS.map((s) => [s, onEarly(s)] as const);
  for (const [s, h] of earlyHandlers) process.on(s, h);
  const stoppedEarly = () => 128 + (early ? (constants.signals[early] ?? 0) : 0);
  let requested: Awaited<ReturnType<typeof requestCredential>>;
  try {
    const base = brokerUrl(opts.url);
    const token = await obtainToken(opts);
    // Not asked for at all when the signal came while the token was being fetched.
    if (early) return stoppedEarly();
    requested = await issueWith(token, base, opts);
    if (early) {
      if (opts.keep) process.stderr.write(`pg-broker exec: ${leaseNotice(requested.credential.lease_id, requested.credential.expires_at)} (kept: --keep)\n`);
      else await revoke(requested.base, opts, requested.credential.lease_id, 'exec');
      return stoppedEarly();
    }
  } catch (err) {
    if (!early) throw err;
    process.stderr.write(`pg-broker exec: ${(err as Error).message}\n`);
    return stoppedEarly();
  } finally {
    // Until here, including the revocation above: a signal during it must not leave the lease.
    for (const [s, h] of earlyHandlers) process.removeListener(s, h);
  }
  const { credential, base } = requested;
  let serverClock = requested.serverClock;
  let expiresAt = credential.expires_at;
  let maxExpiresAt = credential.max_expires_at;
  // Without --ttl a renew names none and the broker applies the policy's default_ttl on its own
  // clock. A ttl worked out here from expires_at would carry this machine's clock error into
  // every renewal: a clock running ahead would shorten each one.
  const renewBody = opts.ttl === undefined ? {} : { ttl: opts.ttl };

  // The command gets the database login, not the bearer token that obtained it.
  const { PG_BROKER_TOKEN: _token, ...inherited } = process.env;
  const child = spawn(command[0], command.slice(1), { stdio: 'inherit', env: { ...inherited, ...pgEnvironment(credential), PG_BROKER_LEASE_ID: credential.lease_id } });
  // A signal not forwarded is still handled: exec waits for the command to end, then revokes.
  const forwarded = signalsToForward(process.stdin.isTTY === true);
  const handle = (signal: NodeJS.Signals) => () => {
    if (forwarded.includes(signal)) child.kill(signal);
  };
  const handlers = EXEC_SIGNALS.map((s) => [s, handle(s)] as const);
  for (const [s, h] of handlers) process.on(s, h);

  // Renew at two thirds of the remaining lifetime, with a fresh token each time (CI tokens are
  // short-lived). A failed renew is retried with backoff while the lease still has time: giving up
  // after one 503 or refused connection would let the lease lapse mid-command, and the reaper
  // would then kill the command's sessions.
  let timer: NodeJS.Timeout | undefined;
  let childExited = false;
  let failures = 0;
  const leaseTimes = () => ({ expiresAtMs: Date.parse(expiresAt), maxExpiresAtMs: Date.parse(maxExpiresAt) });
  // expires_at is compared with the broker's clock as its latest answer read it, and with this machine's.
  const delayMs = (failures: number) => renewDelayMs(leaseTimes(), serverClock, performance.now(), Date.now(), failures);
  const scheduleRenew = (delayMs: number | null) => {
    if (childExited || delayMs === null) return;
    timer = setTimeout(renew, delayMs);
    timer.unref();
  };
  const renew = async () => {
    try {
      const token = await obtainToken(opts);
      const { body, serverClock: answered } = await callBroker<LeaseBody>(base, token, 'POST', `/leases/${credential.lease_id}/renew`, renewBody);
      serverClock = answered ?? serverClock;
      expiresAt = body.expires_at;
      // The bound moves earlier when the policy's max_ttl was lowered since issuance.
      maxExpiresAt = body.max_expires_at;
      failures = 0;
      scheduleRenew(delayMs(failures));
    } catch (err) {
      if (childExited) return;
      failures += 1;
      const message = (err as Error).message;
      const final = isFinalRenewFailure(err);
      const retryMs = final ? null : delayMs(failures);
      const outcome = final ? 'giving up'
        : retryMs === null ? `giving up, the lease ends at ${expiresAt}`
        : `retrying in ${Math.ceil(retryMs / 1000)} s (the lease ends at ${expiresAt})`;
      process.stderr.write(`pg-broker exec: could not renew lease ${credential.lease_id}: ${message}; ${outcome}\n`);
      scheduleRenew(retryMs);
    }
  };
  scheduleRenew(delayMs(0));

  try {
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      child.once('error', (err) => reject(new CliError(`cannot run ${command[0]}: ${err.message}`, 127)));
      child.once('exit', (c, s) => resolve([c, s]));
    }).finally(() => {
      childExited = true;
      clearTimeout(timer);
    });
    return code ?? 128 + (signal ? (constants.signals[signal] ?? 0) : 0);
  } finally {
    // The handlers stay until the revocation is done: a Ctrl-C now must not leave the lease.
    if (!opts.keep) await revoke(base, opts, credential.lease_id, 'exec');
    // Its last expiry, renewals counted; the command had the id in PG_BROKER_LEASE_ID, its caller not.
    else process.stderr.write(`pg-broker exec: ${leaseNotice(credential.lease_id, expiresAt)} (kept: --keep)\n`);
    for (const [s, h] of handlers) process.removeListener(s, h);
  }
}

/**
 * Revokes a lease this command obtained; says so on stderr and answers false when it cannot. It
 * waits as long as `leases revoke` does: the broker answers once sessions are ended and the role
 * dropped, and giving up sooner reported a failure for a revocation that then completed.
 */
async function revoke(base: string, opts: TokenOptions, leaseId: string, command: string): Promise<boolean> {
  try {
    const token = await obtainToken(opts);
    await callBroker(base, token, 'DELETE', `/leases/${leaseId}`, undefined, REVOKE_TIMEOUT_MS);
    return true;
  } catch (err) {
    process.stderr.write(`pg-broker ${command}: could not revoke lease ${leaseId}; it ends at its expiry: ${(err as Error).message}\n`);
    return false;
  }
}
