import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { matchClaims, validatePatterns, type ClaimPatterns } from '../../src/policy/match.js';

// Tokens an attacker can really obtain, against the rules a policy author would write: another
// organisation whose name starts with ours, the other `sub` forms GitHub issues, a public reusable
// workflow called from a foreign repository, a Kubernetes namespace that shares a prefix.

const fixtures = JSON.parse(readFileSync(new URL('../fixtures/github-actions-claims.json', import.meta.url), 'utf8'));
const push: Record<string, unknown> = fixtures.push_to_main;
const admitted = (patterns: ClaimPatterns, claims: Record<string, unknown>) => matchClaims(patterns, claims).length === 0;

/** A push to main of `repository`, calling the workflow `jobWorkflowRef`. */
function githubPush(repository: string, jobWorkflowRef = `${repository}/.github/workflows/migrate.yml@refs/heads/main`): Record<string, unknown> {
  const [owner] = repository.split('/');
  return { ...push, sub: `repo:${repository}:ref:refs/heads/main`, repository, repository_owner: owner, repository_owner_id: '666', repository_id: '667', job_workflow_ref: jobWorkflowRef };
}

test('an organisation whose name extends ours matches neither repo:octo-org/* nor octo-org/*', () => {
  const evil = githubPush('octo-org-evil/octo-repo');
  assert.equal(admitted({ sub: 'repo:octo-org/*' }, evil), false);
  assert.equal(admitted({ repository: 'octo-org/*' }, evil), false);
  assert.equal(admitted({ repository_owner: 'octo-org' }, evil), false);
  assert.equal(admitted({ repository_owner_id: '65' }, evil), false);
  // Without the slash the prefix is the author's mistake, and it admits the lookalike.
  assert.equal(admitted({ sub: 'repo:octo-org*' }, evil), true);
  assert.equal(admitted({ sub: 'repo:octo-org/*' }, push), true);
});

test('a * spanning ":" cannot turn a pull request, tag or environment sub into a branch one', () => {
  const main = { sub: 'repo:octo-org/*:ref:refs/heads/main' };
  assert.equal(admitted(main, fixtures.pull_request), false);
  assert.equal(admitted(main, fixtures.tag), false);
  assert.equal(admitted(main, fixtures.deploy_to_environment), false);
  // GitHub writes a ':' inside a value as %3A, so an environment cannot end in ":ref:refs/heads/main".
  assert.equal(admitted(main, { sub: 'repo:octo-org/octo-repo:environment:x%3Aref%3Arefs/heads/main' }), false);
  assert.equal(admitted(main, push), true);
});

test('the immutable sub format matches only rules written for it', () => {
  const ids = { sub: fixtures.immutable_sub_format.sub };
  assert.equal(admitted({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/main' }, ids), false);
  assert.equal(admitted({ sub: 'repo:octo-org/*' }, ids), false);
  assert.equal(admitted({ sub: ['repo:octo-org/octo-repo:ref:refs/heads/main', 'repo:octo-org@65/octo-repo@74:ref:refs/heads/main'] }, ids), true);
  assert.equal(admitted({ sub: 'repo:octo-org@65/*' }, { sub: 'repo:octo-org-evil@666/octo-repo@74:ref:refs/heads/main' }), false);
});

test('job_workflow_ref names the called workflow, not the caller: alone it admits a foreign repository', () => {
  // Any repository may call a public reusable workflow, and its token then carries that workflow's ref.
  const foreign = githubPush('mallory/anything', 'octo-org/octo-automation/.github/workflows/oidc.yml@refs/heads/main');
  const workflowOnly = { job_workflow_ref: 'octo-org/octo-automation/.github/workflows/oidc.yml@refs/heads/main' };
  assert.equal(validatePatterns(workflowOnly), null, 'the text check cannot tell');
  assert.equal(admitted(workflowOnly, foreign), true);
  assert.equal(admitted({ ...workflowOnly, repository_owner_id: '65' }, foreign), false);
  assert.equal(admitted({ ...workflowOnly, repository_owner_id: '65' }, push), true);
});

test('Kubernetes: a namespace sharing a prefix, and a sub pattern, stay within the namespace', () => {
  const token = (namespace: string, name: string) => ({
    sub: `system:serviceaccount:${namespace}:${name}`, 'kubernetes.io': { namespace, serviceaccount: { name } },
  });
  const pointers = { '/kubernetes.io/namespace': 'prod', '/kubernetes.io/serviceaccount/name': 'billing' };
  assert.equal(admitted(pointers, token('prod', 'billing')), true);
  assert.equal(admitted(pointers, token('prod-evil', 'billing')), false);
  assert.equal(admitted(pointers, token('prod', 'billing-evil')), false);
  assert.equal(admitted({ sub: 'system:serviceaccount:prod:*' }, token('prod-evil', 'billing')), false);
  // The dotted name is one claim: a flat claim spelt with the path is another claim, never read for the pointer.
  assert.equal(admitted(pointers, { 'kubernetes.io/namespace': 'prod', 'kubernetes.io': { namespace: 'dev', serviceaccount: { name: 'billing' } } }), false);
});
