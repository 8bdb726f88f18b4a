import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { loadConfig } from '../../src/config.js';
import { env, GOOD, rejects } from './config-env.js';

describe('a bad setting says what to write, not the schema rule', () => {
  test('JSON and shape errors say where and what, in the operator\'s terms rather than the schema\'s', () => {
    const cases: Array<[string, string, string]> = [
      ['BROKER_ADMINS', '[{', 'BROKER_ADMINS: is not valid JSON: expected property name or \'}\' at line 1, column 3'],
      ['BROKER_ADMINS', '[\n  {"issuer": "https://a.example"\n   "claims": {}}\n]', 'BROKER_ADMINS: is not valid JSON: expected \',\' or \'}\' after property value at line 3, column 4'],
      ['BROKER_ADMINS', '[1,]', 'BROKER_ADMINS: is not valid JSON: unexpected token \']\', "[1,]"'],
      ['BROKER_ADMINS', '[] x', 'BROKER_ADMINS: is not valid JSON: unexpected non-whitespace character after JSON at line 1, column 4'],
      ['BROKER_ISSUERS', '[{"issuer": "https://a.example",]', 'BROKER_ISSUERS: is not valid JSON: expected double-quoted property name at line 1, column 33'],
      ['BROKER_ADMINS', '{"issuer": "https://a.example"}', 'BROKER_ADMINS: must be a JSON array of {"issuer": "https://…", "claims": {"sub": "pattern", …}} objects, not an object'],
      ['BROKER_ADMINS', '["admin"]', 'BROKER_ADMINS: entry 1: must be an object {"issuer": "https://…", "claims": {"sub": "pattern", …}}, not a string'],
      ['BROKER_ISSUERS', '[{"issuer": "https://a.example"}, null]', 'BROKER_ISSUERS: entry 2: must be an object {"issuer": "https://…", "jwks_uri"?: "https://…", "audience"?: "…"}, not null'],
      ['BROKER_ISSUERS', '[{"issuer": "https://a.example", "audience": ""}]', 'BROKER_ISSUERS: entry 1: audience must be a non-empty string'],
      ['BROKER_ISSUERS', '[{"issuer": 5}]', 'BROKER_ISSUERS: entry 1: issuer must be an http(s) URL'],
      ['BROKER_ISSUERS', '[{"jwks_uri": "https://a.example/jwks"}]', 'BROKER_ISSUERS: entry 1: issuer is required'],
      ['BROKER_ADMINS', `[{"issuer": "${GOOD.BROKER_ISSUERS}", "claims": ["sub"]}]`, 'BROKER_ADMINS: entry 1: claims must be an object mapping claim names to patterns, not an array'],
      ['BROKER_ADMINS', `[{"issuer": "${GOOD.BROKER_ISSUERS}", "claims": {"/kubernetes.io/namespace": [5]}}]`, 'BROKER_ADMINS: entry 1: claim "/kubernetes.io/namespace" must be a pattern or a non-empty list of patterns (strings)'],
      ['BROKER_ADMINS', `[{"issuer": "${GOOD.BROKER_ISSUERS}", "claims": {"sub": "a"}, "role": "x"}]`, 'BROKER_ADMINS: entry 1: unknown field "role" (an entry is {"issuer": "https://…", "claims": {"sub": "pattern", …}})'],
    ];
    for (const [variable, value, message] of cases) {
      assert.equal(rejects({ [variable]: value }, variable).message, message, value);
    }
  });

  test('a bad number states the accepted range and what it got; both ends of each range are accepted', () => {
    const ranges: Array<[string, string, number, number]> = [
      ['PORT', '', 0, 65535], ['BROKER_PUBLIC_PG_PORT', '', 1, 65535], ['BROKER_METRICS_PORT', '', 1, 65535],
      ['BROKER_REAPER_INTERVAL', 'of seconds ', 1, 3600], ['BROKER_GRANT_RECHECK_INTERVAL', 'of seconds ', 0, 3600],
      ['BROKER_LOCK_TIMEOUT', 'of seconds ', 0, 3600], ['BROKER_QUERY_TIMEOUT', 'of seconds ', 0, 3600],
      ['BROKER_RATE_LIMIT_IP', 'of requests per minute ', 1, 1e9], ['BROKER_RATE_LIMIT_IDENTITY', 'of requests per minute ', 1, 1e9],
      ['BROKER_DB_POOL_SIZE', '', 1, 1000], ['BROKER_SCRAM_ITERATIONS', '', 1, 1e6],
    ];
    const written = (n: number) => (n >= 100_000 ? n.toLocaleString('en-US') : String(n));
    for (const [variable, unit, min, max] of ranges) {
      // A query timeout must outlast the lock timeout: the other one is 0 (off) here.
      const others = variable === 'BROKER_LOCK_TIMEOUT' ? { BROKER_QUERY_TIMEOUT: '0' } : { BROKER_LOCK_TIMEOUT: '0' };
      for (const bad of [String(min - 1), String(max + 1), '1.5', 'ten', '99999999999999999999999']) {
        const err = rejects({ ...others, [variable]: bad }, variable);
        assert.equal(err.message, `${variable}: must be a whole number ${unit}from ${written(min)} to ${written(max)} (got ${JSON.stringify(bad)})`);
      }
      for (const good of [min, max]) {
        assert.doesNotThrow(() => loadConfig(env({ ...others, [variable]: ` ${good} ` })), `${variable}=${good}`);
      }
    }
    assert.equal(rejects({ BROKER_REAPER_INTERVAL: '0' }, 'BROKER_REAPER_INTERVAL').message,
      'BROKER_REAPER_INTERVAL: must be a whole number of seconds from 1 to 3600 (got "0")');
    // A long value is cut short in the message.
    assert.match(rejects({ PORT: '9'.repeat(100) }, 'PORT').message, /\(got "9{40}…"\)$/);
  });
});
