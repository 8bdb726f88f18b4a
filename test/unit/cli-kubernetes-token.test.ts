import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CliError, refuseOtherAudience } from '../../src/cli/client.js';

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
