import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { readPolicyFile } from '../../src/cli/policy-file.js';

let dir: string;
before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'pgcb-policy-file-'));
});
after(async () => rm(dir, { recursive: true, force: true }));

async function refusal(text: string): Promise<string> {
  const file = path.join(dir, 'p.yaml');
  await writeFile(file, text);
  const err = await readPolicyFile(file).then(() => null, (e: Error) => e);
  assert.ok(err, 'refused');
  return err.message.slice(file.length + 2);
}

const fields = 'issuer: https://issuer.example\n    grant_role: app_readers\n    database: app\n';

describe('policy apply: a field the file gets wrong is named', () => {
  test('a misspelt field is named, with the fields a policy has, not reported as the field it lacks', async () => {
    assert.equal(await refusal(`policies:\n  p:\n    ${fields}    claimz: {sub: "x:1"}\n`),
      'policy p: unknown field "claimz"; a policy\'s fields are description, issuer, audience, claims, grant_role, database, default_ttl, max_ttl, max_active_leases, connection_limit, assume_role, enabled');
    assert.match(await refusal(`policies:\n  - name: p\n    ${fields}    claims: {sub: "x:1"}\n    ttl: 60\n`), /^policy p: unknown field "ttl"; /);
  });
  test('a missing field is named as required', async () => {
    assert.equal(await refusal(`policies:\n  p:\n    ${fields}`), 'policy p: claims is required');
  });
  test('an unquoted true or number in claims (GitLab\'s ref_protected is the string "true") says to quote it', async () => {
    assert.equal(await refusal(`policies:\n  p:\n    ${fields}    claims: {project_path: mygroup/myproject, ref_protected: true}\n`),
      'policy p: claim "ref_protected": the pattern true is a YAML boolean, but patterns are text: quote it ("true")');
    assert.equal(await refusal(`policies:\n  p:\n    ${fields}    claims:\n      project_path: mygroup/myproject\n      project_id: [90211, "90212"]\n`),
      'policy p: claim "project_id": the pattern 90211 is a YAML number, but patterns are text: quote it ("90211")');
    const file = path.join(dir, 'quoted.yaml');
    await writeFile(file, `policies:\n  p:\n    ${fields}    claims: {project_path: mygroup/myproject, ref_protected: "true", project_id: ["90211"]}\n`);
    assert.deepEqual((await readPolicyFile(file)).get('p')?.claims, { project_path: 'mygroup/myproject', ref_protected: 'true', project_id: ['90211'] });
  });
  test('the good input reads', async () => {
    const file = path.join(dir, 'good.yaml');
    await writeFile(file, `policies:\n  p:\n    ${fields}    claims: {sub: "x:1"}\n`);
    assert.deepEqual([...(await readPolicyFile(file)).keys()], ['p']);
  });
});
