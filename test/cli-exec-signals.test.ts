import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { identityLockKey } from '../src/leases/repository.js';
import { waitFor, type TestBroker } from './helpers/broker.js';
import { BIN, startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let url: string;
let tmp: string;
let cli: CliBench['cli'];

before(async () => {
  ({ b, url, home: tmp, cli } = await startCliBench('pgcb-cli-exec-signals-'));
});
after(async () => b?.close());

/**
 * A command for `exec` that counts the SIGINTs it gets and, on SIGTERM, exits with 10 + that
 * count. exec forwards SIGTERM in every case, and handles signals in the order they came, so by
 * the time the command sees that SIGTERM it has seen any SIGINT exec passed on before it.
 */
async function sigintCounter(): Promise<{ file: string; started(): Promise<{ execPid: number; leaseId: string }>; sigintSeen(): Promise<true> }> {
  const dir = await mkdtemp(path.join(tmp, 'signals-'));
  const file = path.join(dir, 'command.cjs');
  const started = path.join(dir, 'started');
  const seen = path.join(dir, 'sigint');
  await writeFile(file, `const fs = require('fs');
    let sigints = 0;
    process.on('SIGINT', () => { sigints += 1; fs.writeFileSync(${JSON.stringify(seen)}, String(sigints)); });
    process.on('SIGTERM', () => process.exit(10 + sigints));
    // Written whole, then renamed into place: the test must never read it half-written.
    fs.writeFileSync(${JSON.stringify(started + '.tmp')}, JSON.stringify({ execPid: process.ppid, leaseId: process.env.PG_BROKER_LEASE_ID }));
    fs.renameSync(${JSON.stringify(started + '.tmp')}, ${JSON.stringify(started)});
    setInterval(() => {}, 1000);`);
  return {
    file,
    started: () => waitFor('exec to start the command', async () => (existsSync(started) ? JSON.parse(await readFile(started, 'utf8')) : null)),
    sigintSeen: () => waitFor('the command to get a SIGINT', async () => existsSync(seen) || null),
  };
}

describe('pg-broker exec and signals', () => {
  const leaseState = async (id: string) => (await b.pg.query(`SELECT state FROM broker.leases WHERE id = $1`, [id]))[0].state;

  test('at a terminal, Ctrl-C reaches the command once (from the terminal, not again from exec), and exec still revokes',
    { skip: !existsSync('/usr/bin/script') && 'needs script(1) to run exec under a pseudo-terminal' }, async () => {
      const token = await b.token({ sub: 'cli:ctrl-c' });
      const command = await sigintCounter();
      // script(1) gives exec a pseudo-terminal as stdin; a ^C written to it becomes a SIGINT
      // to the terminal's foreground process group, exec and its command both.
      const term = spawn('/usr/bin/script', ['-qec', 'exec "$NODE" "$BIN" exec -- "$NODE" "$COMMAND"', '/dev/null'], {
        env: { PATH: process.env.PATH!, HOME: tmp, PG_BROKER_URL: url, PG_BROKER_TOKEN: token, NODE: process.execPath, BIN, COMMAND: command.file },
        stdio: ['pipe', 'pipe', 'pipe'],
      });
      let output = '';
      term.stdout.on('data', (d) => { output += d; });
      term.stderr.on('data', (d) => { output += d; });
      const exited = new Promise<number | null>((r) => term.once('exit', (code) => r(code)));
      try {
        const { execPid, leaseId } = await command.started();
        term.stdin.write('\x03');
        await command.sigintSeen();
        process.kill(execPid, 'SIGTERM');
        assert.equal(await exited, 11, `one SIGINT, not two: ${output}`);
        assert.equal(await leaseState(leaseId), 'revoked', 'exec outlived Ctrl-C and revoked the lease');
      } finally {
        term.kill('SIGKILL');
      }
    });

  test('without a terminal (CI, kill -INT), exec passes SIGINT on to the command', async () => {
    const token = await b.token({ sub: 'cli:kill-int' });
    const command = await sigintCounter();
    const running = cli(['exec', '--token', token, '--', process.execPath, command.file]);
    const { execPid, leaseId } = await command.started();
    process.kill(execPid, 'SIGINT');
    await command.sigintSeen();
    process.kill(execPid, 'SIGTERM');
    const run = await running;
    assert.equal(run.code, 11, run.stderr);
    assert.equal(await leaseState(leaseId), 'revoked');
  });

  test('a SIGINT while the credential is still being issued: the command never starts, and the credential is revoked once it arrives', async () => {
    const sub = 'cli:early-int';
    const token = await b.token({ sub });
    const marker = path.join(tmp, `early-int-${Date.now()}`);
    // Issuance for this subject waits on its identity lock while another session holds it.
    const superuser = new URL(b.pg.superuserUrl);
    superuser.pathname = `/${b.pg.database}`;
    const holder = new pg.Client({ connectionString: superuser.toString() });
    await holder.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [identityLockKey(b.issuer.issuer, sub)]);
      const exec = spawn(process.execPath, [BIN, 'exec', '--token', token, '--', process.execPath, '-e', `require('fs').writeFileSync(${JSON.stringify(marker)}, '')`], {
        env: { PATH: process.env.PATH!, HOME: tmp, PG_BROKER_URL: url }, stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      exec.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<number | null>((resolve) => exec.once('exit', (code) => resolve(code)));
      await waitFor('the issuance to wait on the lock', async () => (await b.pg.query(
        `SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-credential-broker' AND wait_event_type = 'Lock'`)).length > 0);
      exec.kill('SIGINT');
      await waitFor('exec to take the signal', async () => stderr.includes('the command will not start') || null);
      await holder.query('ROLLBACK');
      assert.equal(await exited, 130, stderr);
      assert.equal(existsSync(marker), false, 'the command never ran');
      const leases = await b.pg.query(`SELECT state FROM broker.leases WHERE subject = $1`, [sub]);
      assert.deepEqual(leases, [{ state: 'revoked' }], 'issued, then revoked');
    } finally {
      await holder.end().catch(() => undefined);
    }
  });
});
