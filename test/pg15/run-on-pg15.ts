import { existsSync } from 'node:fs';
import { test } from 'node:test';

export const PG15_AVAILABLE = existsSync('/usr/lib/postgresql/15/bin/initdb');

/**
 * Runs another suite file against PostgreSQL 15 (Debian's postgresql-15), whose CREATEROLE and
 * role-membership semantics differ from 16+. Each test file runs in its own process, so setting
 * the flavor before importing the suite affects only that run.
 */
export async function runOnPg15(suite: string): Promise<void> {
  if (!PG15_AVAILABLE) {
    test(`${suite} on PostgreSQL 15`, { skip: 'postgresql-15 is not installed here (.ci/run installs it)' }, () => {});
    return;
  }
  process.env.PG_TEST_FLAVOR = 'pg15';
  await import(suite);
}
