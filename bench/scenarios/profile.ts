import fs from 'node:fs';
import path from 'node:path';
import type { BrokerChild } from '../lib/broker.js';
import { httpLoad } from '../lib/load.js';
import { log } from '../lib/log.js';
import { dropIssuedRoles } from '../lib/population.js';
import type { ProfileSummary } from '../lib/profile.js';
import { QUICK, REPORT_PATH, ROOT, SETTINGS, TUNED_ITERATIONS } from '../lib/settings.js';
import type { BenchContext } from './context.js';

/**
 * A V8 CPU profile of the broker process during tuned issuance at 16 clients, written beside
 * the report under profiles/ and summarised by package and by function.
 */
export async function runProfile(ctx: BenchContext, broker: BrokerChild): Promise<void> {
  const { pgs, tokens } = ctx;
  const dir = path.join(path.dirname(REPORT_PATH), 'profiles');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `issuance-tuned-c16${QUICK ? '-quick' : ''}.cpuprofile`);
  await broker.request('profile-start');
  let requests = 0;
  for (let i = 0; i < SETTINGS.profileBursts; i++) {
    await dropIssuedRoles(pgs, 'runs');
    requests += (await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections: 16, amount: SETTINGS.burst, tokens, expect: 201 })).ok;
  }
  const summary = await broker.request<ProfileSummary>('profile-stop', { file });
  await dropIssuedRoles(pgs, 'runs');
  ctx.results.profile = { scenario: `POST /credentials, 16 connections, BROKER_SCRAM_ITERATIONS=${TUNED_ITERATIONS}, ${SETTINGS.profileBursts} bursts of ${SETTINGS.burst}`, file: path.relative(ROOT, file), ...summary, requests };
  log(`profile written to ${file}`);
}
