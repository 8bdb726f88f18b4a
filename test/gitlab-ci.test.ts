import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { parse as parseYaml } from 'yaml';
import { loadConfig } from '../src/config.js';
import { isAdmin } from '../src/auth/verify.js';
import { matchClaims, type ClaimPatterns } from '../src/policy/match.js';
import { api, AUDIENCE, connectAs, startTestBroker, type TestBroker } from './helpers/broker.js';
import { startIssuer, type TestIssuer } from './helpers/issuer.js';

// GitLab CI/CD ID tokens (`id_tokens:` in .gitlab-ci.yml) from end to end: tokens shaped like
// test/fixtures/gitlab-ci-claims.json, really signed, checked against the policy the README's
// GitLab CI section shows (read from README.md, so the two cannot drift apart), and the
// credential used to log in.

type Claims = Record<string, unknown>;
const fixtures = JSON.parse(readFileSync(new URL('./fixtures/gitlab-ci-claims.json', import.meta.url), 'utf8')) as Record<string, Claims>;

// The README's GitLab CI section and its fenced blocks, in order.
const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
const section = readme.slice(readme.indexOf('\n### GitLab CI\n'), readme.indexOf('\n## HTTP API\n'));
const blocks = [...section.matchAll(/```(\w+)\n([\s\S]*?)```/g)].map(([, lang, body]) => ({ lang, body }));
const policyBlock = blocks.find((block) => block.lang === 'json' && block.body.startsWith('PUT /policies/gitlab-migrate\n'));
const readmePolicy = JSON.parse(policyBlock?.body.slice(policyBlock.body.indexOf('\n')) ?? 'null') as { issuer: string; claims: ClaimPatterns } | null;
const MIGRATE_CLAIMS = readmePolicy?.claims ?? {};
const CONFIG_ON_MAIN = 'gitlab.example.com/mygroup/myproject//.gitlab-ci.yml@refs/heads/main';

/**
 * A fixture entry laid over protected_main, with the fixture's times replaced by current ones
 * as GitLab sets them (valid from 5 s before issue, until the job's timeout, 1 h by default);
 * sign() puts the test issuer in iss.
 */
function gitlabClaims(variant?: string, extra: Claims = {}): Claims {
  const { iss: _iss, ...base } = fixtures.protected_main;
  const { _note, ...changes } = variant ? fixtures[variant] : {};
  const now = Math.floor(Date.now() / 1000);
  return { ...base, ...changes, iat: now, nbf: now - 5, exp: now + 3600, ...extra };
}

let b: TestBroker;
let gitlab: TestIssuer;

before(async () => {
  assert.ok(readmePolicy, 'README.md\'s GitLab CI section holds the body of PUT /policies/gitlab-migrate');
  gitlab = await startIssuer();
  b = await startTestBroker({ issuer: gitlab });
  // The README's policy as written, on the test issuer and database.
  await b.putPolicy('gitlab-migrate', { claims: MIGRATE_CLAIMS, default_ttl: 300 });
});
after(async () => {
  await b?.close();
  await gitlab?.close();
});

const tokenFor = (variant?: string, extra?: Claims) => gitlab.sign(gitlabClaims(variant, extra));
const evaluate = async (token: string) => {
  const res = await api(b, 'POST', '/policies/evaluate', token);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body.policies.find((p: { name: string }) => p.name === 'gitlab-migrate');
};
// Sorted: a stored policy's claims come back in jsonb's key order, not the order they were written in.
const byClaim = <T extends { claim: string }>(failed: T[]) => [...failed].sort((x, y) => x.claim.localeCompare(y.claim));
const failedClaims = async (token: string) => byClaim((await evaluate(token)).failed_claims).map((f) => f.claim);

describe('GitLab CI ID tokens', () => {
  test('the fixture carries GitLab\'s claim types: ids and ref_protected as strings, runner_id and the times as numbers', () => {
    const token = fixtures.protected_main;
    for (const claim of ['namespace_id', 'project_id', 'user_id', 'pipeline_id', 'job_id', 'ref_protected', 'environment_protected']) {
      assert.equal(typeof token[claim], 'string', claim);
    }
    for (const claim of ['runner_id', 'iat', 'nbf', 'exp']) assert.equal(typeof token[claim], 'number', claim);
    assert.equal(token.sub, `project_path:${token.project_path}:ref_type:${token.ref_type}:ref:${token.ref}`);
    assert.equal(token.ci_config_ref_uri, CONFIG_ON_MAIN);
  });

  test('the README\'s job asks for the broker\'s audience and names the policy, and its issuer and admin lines load', () => {
    assert.equal(readmePolicy?.issuer, fixtures.protected_main.iss);
    const [job, curl] = blocks.filter((block) => block.lang === 'yaml').map((block) => parseYaml(block.body));
    assert.equal(job.migrate.id_tokens.PG_BROKER_TOKEN.aud, AUDIENCE);
    assert.equal(fixtures.protected_main.aud, AUDIENCE);
    assert.ok(job.migrate.script.some((line: string) => / exec --policy gitlab-migrate .* -- /.test(line)), job.migrate.script.join('\n'));
    assert.match(curl.script[0], /-H "Authorization: Bearer \$PG_BROKER_TOKEN".*"policy": "gitlab-migrate"/);
    assert.match(curl.after_script[0], /-X DELETE .*\/leases\//);
    const env = (name: string) => [...section.matchAll(new RegExp(`^export ${name}=(.+?)(?:\\s+#.*)?$`, 'gm'))].map(([, v]) => v.replace(/^'|'$/g, ''));
    const [admins] = env('BROKER_ADMINS');
    assert.ok(env('BROKER_ISSUERS').length >= 5);
    for (const issuers of env('BROKER_ISSUERS')) {
      const config = loadConfig({ DATABASE_URL: 'postgres://broker:pw@db.internal:5432/broker', BROKER_ISSUERS: issuers, BROKER_AUDIENCE: AUDIENCE });
      assert.ok(config.issuers.length >= 1, issuers);
    }
    const config = loadConfig({ DATABASE_URL: 'postgres://broker:pw@db.internal:5432/broker', BROKER_ISSUERS: 'https://gitlab.example.com', BROKER_AUDIENCE: AUDIENCE, BROKER_ADMINS: admins });
    const policyProject = { ...gitlabClaims(), project_path: 'platform/db-policies', project_id: '5120', ci_config_ref_uri: 'gitlab.example.com/platform/db-policies//.gitlab-ci.yml@refs/heads/main' };
    assert.equal(isAdmin(config.admins, 'https://gitlab.example.com', policyProject), true);
    assert.equal(isAdmin(config.admins, 'https://gitlab.example.com', { ...policyProject, ref_protected: 'false' }), false);
    assert.equal(isAdmin(config.admins, 'https://gitlab.example.com', gitlabClaims()), false, 'the application project is no admin');
  });

  test('a protected-branch pipeline of the pinned project gets a credential that logs in', async () => {
    const res = await b.issue(await tokenFor());
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.equal(res.body.policy, 'gitlab-migrate');
    const client = await connectAs(b.pg, res.body);
    try {
      const { rows } = await client.query('SELECT session_user AS who, count(*)::int AS n FROM public.widgets GROUP BY 1');
      assert.equal(rows.length, 1);
      assert.equal(rows[0].who, res.body.username);
      assert.ok(rows[0].n > 0, 'app_readers may read widgets');
    } finally {
      await client.end();
    }
    // The lease keeps the claims the policy matched, as the token held them (not the e-mail and the rest).
    const lease = await api(b, 'GET', `/leases/${res.body.lease_id}`, await b.adminToken());
    assert.equal(lease.status, 200);
    assert.equal(lease.body.subject, 'project_path:mygroup/myproject:ref_type:branch:ref:main');
    assert.deepEqual(lease.body.claims, {
      project_path: 'mygroup/myproject', project_id: '90211', ref_protected: 'true', ref_path: 'refs/heads/main', ci_config_ref_uri: CONFIG_ON_MAIN, pipeline_source: 'push',
    });
  });

  test('an unprotected branch is refused, and evaluate names each failing claim with its value and patterns', async () => {
    const refused = await b.issue(await tokenFor('unprotected_branch'));
    assert.equal(refused.status, 403, JSON.stringify(refused.body));
    assert.equal(refused.body.code, 'NO_POLICY');
    assert.match(refused.body.detail, /POST \/policies\/evaluate explains why/);
    const verdict = await evaluate(await tokenFor('unprotected_branch'));
    assert.deepEqual({ ...verdict, failed_claims: byClaim(verdict.failed_claims) }, {
      name: 'gitlab-migrate', admitted: false,
      failed_claims: [
        { claim: 'ci_config_ref_uri', patterns: [CONFIG_ON_MAIN], value: 'gitlab.example.com/mygroup/myproject//.gitlab-ci.yml@refs/heads/feature/add-index' },
        { claim: 'ref_path', patterns: ['refs/heads/main'], value: 'refs/heads/feature/add-index' },
        { claim: 'ref_protected', patterns: ['true'], value: 'false' },
      ],
    });
    // main itself with its protection removed: ref_protected alone refuses it.
    const unprotectedMain = await tokenFor(undefined, { ref_protected: 'false' });
    assert.equal((await b.issue(unprotectedMain)).status, 403);
    assert.deepEqual((await evaluate(unprotectedMain)).failed_claims, [{ claim: 'ref_protected', patterns: ['true'], value: 'false' }]);
    // The matching good token, through the same two doors.
    const good = await tokenFor();
    assert.deepEqual(await evaluate(good), { name: 'gitlab-migrate', admitted: true, failed_claims: [] });
    assert.equal((await b.issue(good)).status, 201);
  });

  test('lookalike projects, another config file, a tag, a merge request and a schedule are refused, each for the claims that differ', async () => {
    const cases: Array<[string, Claims, string[]]> = [
      ['fork_lookalike', {}, ['ci_config_ref_uri', 'project_id', 'project_path']],
      ['subgroup_lookalike', {}, ['ci_config_ref_uri', 'project_id', 'project_path']],
      ['external_config', {}, ['ci_config_ref_uri']],
      ['protected_tag', {}, ['ci_config_ref_uri', 'ref_path']],
      ['merge_request', {}, ['ci_config_ref_uri', 'pipeline_source', 'ref_path', 'ref_protected']],
      ['protected_main', { pipeline_source: 'schedule' }, ['pipeline_source']],
    ];
    for (const [variant, extra, failing] of cases) {
      const token = await tokenFor(variant === 'protected_main' ? undefined : variant, extra);
      const res = await b.issue(token);
      assert.equal(res.status, 403, `${variant}: ${JSON.stringify(res.body)}`);
      assert.deepEqual(await failedClaims(token), failing, variant);
      const projectPath = (await evaluate(token)).failed_claims.find((f: { claim: string }) => f.claim === 'project_path');
      if (projectPath) assert.deepEqual(projectPath, { claim: 'project_path', patterns: ['mygroup/myproject'], value: fixtures[variant].project_path });
    }
    // A manual run from the web UI is one of the starts the policy names.
    assert.deepEqual(await failedClaims(await tokenFor(undefined, { pipeline_source: 'web' })), []);
    assert.equal((await b.issue(await tokenFor())).status, 201, 'the real project\'s token still gets in');
  });

  test('why the README pins project_path exactly: a trailing * or a namespace_path rule admits the lookalikes', () => {
    const fork = gitlabClaims('fork_lookalike');
    const sub = gitlabClaims('subgroup_lookalike');
    const looseRules: ClaimPatterns[] = [{ project_path: 'mygroup/myproject*' }, { namespace_path: 'mygroup*' }];
    for (const loose of looseRules) {
      assert.deepEqual(matchClaims(loose, fork), [], JSON.stringify(loose));
      assert.deepEqual(matchClaims(loose, sub), [], JSON.stringify(loose));
    }
    assert.equal(matchClaims({ project_path: 'mygroup/myproject' }, fork).length, 1);
    assert.equal(matchClaims({ project_path: 'mygroup/myproject' }, sub).length, 1);
    assert.deepEqual(matchClaims({ project_path: 'mygroup/myproject' }, gitlabClaims()), []);
  });

  test('aud as a list (id_tokens aud: [pg-broker, …]) is accepted; a token for another service alone is a 401 naming the audience', async () => {
    const listed = await b.issue(await tokenFor(undefined, { aud: ['https://vault.example.com', AUDIENCE] }));
    assert.equal(listed.status, 201, JSON.stringify(listed.body));
    const other = await b.issue(await tokenFor(undefined, { aud: 'https://vault.example.com' }));
    assert.equal(other.status, 401, JSON.stringify(other.body));
    assert.match(other.body.detail, new RegExp(`aud ${AUDIENCE}$`));
  });

  test('a self-managed GitLab under a relative URL root (/gitlab) works through OIDC discovery at <issuer>/.well-known/openid-configuration', async () => {
    const selfManaged = await startIssuer({ path: '/gitlab' });
    // BROKER_ISSUERS as a plain issuer URL: no jwks_uri, so only discovery can find the keys.
    const d = await startTestBroker({ pg: b.pg, issuer: selfManaged, env: { BROKER_ISSUERS: selfManaged.issuer } });
    try {
      assert.match(selfManaged.issuer, /^http:\/\/127\.0\.0\.1:\d+\/gitlab$/);
      assert.deepEqual(d.config.issuers, [{ issuer: selfManaged.issuer }]);
      await d.putPolicy('gitlab-migrate', { claims: MIGRATE_CLAIMS });
      const res = await d.issue(await selfManaged.sign(gitlabClaims()));
      assert.equal(res.status, 201, JSON.stringify(res.body));
      const client = await connectAs(d.pg, res.body);
      await client.end();
      assert.ok(selfManaged.requests.includes('/gitlab/.well-known/openid-configuration'), selfManaged.requests.join());
      assert.ok(selfManaged.requests.includes('/gitlab/jwks'), selfManaged.requests.join());
      assert.ok(!selfManaged.requests.some((r) => r.startsWith('/.well-known/')), 'the host\'s root is not the issuer\'s');
      const refused = await d.issue(await selfManaged.sign(gitlabClaims('unprotected_branch')));
      assert.equal(refused.status, 403, JSON.stringify(refused.body));
    } finally {
      await d.close();
      await selfManaged.close();
    }
  });
});
