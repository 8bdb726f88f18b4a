import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { test } from 'node:test';
import { CliError } from '../../src/cli/client.js';
import { KUBERNETES_TOKEN_FILE, obtainToken, refuseOtherAudience } from '../../src/cli/token.js';

// The automounted service-account token is the pod's key to the Kubernetes API: the CLI falls
// back to it only when it names the broker's audience (a projected token mounted there).
const jwt = (payload: unknown) => [{ alg: 'RS256', kid: 'k' }, payload].map((p) => Buffer.from(JSON.stringify(p)).toString('base64url')).join('.') + '.c2ln';

test('the Kubernetes token file is used only when it is for the broker\'s audience', () => {
  assert.doesNotThrow(() => refuseOtherAudience(jwt({ aud: ['pg-broker'], sub: 'system:serviceaccount:prod:billing' }), 'pg-broker'));
  assert.doesNotThrow(() => refuseOtherAudience(jwt({ aud: 'pg-broker' }), 'pg-broker'));
  assert.doesNotThrow(() => refuseOtherAudience(`${jwt({ aud: ['vault', 'db'] })}\n`, 'db'), '--audience names another');

  const api = jwt({ aud: ['https://kubernetes.default.svc.cluster.local'], sub: 'system:serviceaccount:prod:billing' });
  assert.throws(() => refuseOtherAudience(api, 'pg-broker'), (err: CliError) => {
    assert.ok(err instanceof CliError);
    assert.match(err.message, /is not for the broker \(its audience: "https:\/\/kubernetes\.default\.svc\.cluster\.local"; the broker's: "pg-broker"\)/);
    assert.match(err.message, /pass --token-file/);
    assert.ok(!err.message.includes(api), 'the token itself is not repeated');
    return true;
  });
  for (const odd of ['not-a-jwt', jwt({ sub: 'x' }), jwt({ aud: 7 }), 'a.%%%.c']) {
    assert.throws(() => refuseOtherAudience(odd, 'pg-broker'), /its audience: none readable/, odd);
  }
});

// GitLab CI hands a job its token in the variable its id_tokens: entry names; GitLab sets GITLAB_CI
// in every job. A job that forgot the entry was told about GitHub Actions, or (Kubernetes
// executor) to mount a projected service-account token.
test('in GitLab CI, a missing token points at the job\'s id_tokens: entry', async (t) => {
  const hint = /in GitLab CI, give the job an id_tokens: entry named PG_BROKER_TOKEN with aud: pg-broker/;
  const api = jwt({ aud: ['https://kubernetes.default.svc.cluster.local'] });
  assert.throws(() => refuseOtherAudience(api, 'pg-broker', true), (err: CliError) => hint.test(err.message) && /is not for the broker/.test(err.message));
  assert.throws(() => refuseOtherAudience(api, 'pg-broker'), (err: CliError) => !hint.test(err.message) && /Mount a projected token/.test(err.message));
  if (existsSync(KUBERNETES_TOKEN_FILE)) return t.skip(`${KUBERNETES_TOKEN_FILE} exists here, so no run reaches "no token"`);
  await assert.rejects(obtainToken({}, { GITLAB_CI: 'true' }), (err: CliError) => err instanceof CliError && hint.test(err.message));
  await assert.rejects(obtainToken({ audience: 'db' }, { GITLAB_CI: 'true' }), /id_tokens: entry named PG_BROKER_TOKEN with aud: db/);
  await assert.rejects(obtainToken({}, {}), (err: CliError) => !hint.test(err.message) && /run in GitHub Actions/.test(err.message));
  // The job that has the entry: its token is taken.
  const token = jwt({ aud: 'pg-broker', sub: 'project_path:mygroup/myproject:ref_type:branch:ref:main' });
  assert.equal(await obtainToken({}, { GITLAB_CI: 'true', PG_BROKER_TOKEN: token }), token);
});
