import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { describe, test } from 'node:test';
import { createLogger } from '../src/logger.js';
import { creatorNames, CREATOR_COUNT } from '../src/postgres/creators.js';
import { migrate } from '../src/postgres/migrate.js';
import { api, connectAs, startTestBroker, type TestBroker } from './helpers/broker.js';
import { startPostgres } from './helpers/postgres.js';

const PG15 = existsSync('/usr/lib/postgresql/15/bin/initdb');

/** The grants the README documents for the broker's own role, read back from the catalog. */
async function brokerGrants(b: TestBroker) {
  const [attrs] = await b.pg.query(
    `SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication FROM pg_roles WHERE rolname = 'broker'`);
  const memberships = await b.pg.query<{ role: string; admin: boolean }>(
    `SELECT g.rolname AS role, m.admin_option AS admin FROM pg_auth_members m
       JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member
      WHERE r.rolname = 'broker' AND g.rolname NOT LIKE 'lease\\_%' AND g.rolname NOT LIKE $1 ORDER BY 1`, [`${b.config.managedRole}\\_c%`]);
  return { attrs, memberships };
}

/** 16+: the creator roles, their attributes, and every membership edge to or from them. */
async function creatorGrants(b: TestBroker) {
  const names = creatorNames(b.config.managedRole);
  const roles = await b.pg.query(
    `SELECT rolname, rolsuper, rolcreaterole, rolcanlogin, rolcreatedb, rolbypassrls, rolreplication FROM pg_roles WHERE rolname = ANY($1) ORDER BY 1`, [names]);
  const edges = await b.pg.query<{ role: string; member: string; admin: boolean; inherit: boolean; set: boolean }>(
    `SELECT g.rolname AS role, r.rolname AS member, bool_or(m.admin_option) AS admin, bool_or(m.inherit_option) AS inherit, bool_or(m.set_option) AS set
       FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member
      WHERE g.rolname = ANY($1) OR r.rolname = ANY($1) GROUP BY 1, 2 ORDER BY 1, 2`, [names]);
  return { names, roles, edges };
}

function creatorEdges(names: string[], handedOut: string[]) {
  return names.flatMap((c) => [
    { role: c, member: 'broker', admin: true, inherit: false, set: true },
    ...handedOut.map((g) => ({ role: g, member: c, admin: true, inherit: false, set: false })),
  ]).sort((x, y) => x.role.localeCompare(y.role) || x.member.localeCompare(y.member));
}

function suite(flavor: 'embedded' | 'pg15') {
  return async () => {
    const pgs = await startPostgres({ flavor });
    if (pgs.version >= 16) {
      // createrole_self_grant set cluster-wide must not make the broker a member of its creators,
      // nor a creator a member of the roles it creates: every edge is checked below.
      await pgs.query(`ALTER SYSTEM SET createrole_self_grant = 'set, inherit'`, [], 'postgres');
      await pgs.query('SELECT pg_reload_conf()', [], 'postgres');
      // The postmaster rereads its configuration asynchronously: wait until new sessions see it.
      for (let i = 0; (await pgs.query('SHOW createrole_self_grant'))[0].createrole_self_grant !== 'set, inherit'; i++) {
        assert.ok(i < 100, 'createrole_self_grant never took effect');
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    }
    const b = await startTestBroker({ pg: pgs });
    try {
      const { attrs, memberships } = await brokerGrants(b);
      assert.deepEqual(attrs, { rolsuper: false, rolcreaterole: true, rolcreatedb: false, rolbypassrls: false, rolreplication: false });
      const admin = pgs.version >= 16;
      // 16+: ADMIN OPTION on each group (no INHERIT, no SET), and the marker role's creator is
      // its ADMIN member automatically. 15: no membership at all; CREATEROLE covers granting.
      const expected = admin
        ? [{ role: 'app_migrators', admin }, { role: 'app_readers', admin }, { role: b.config.managedRole, admin: true }].sort((x, y) => x.role.localeCompare(y.role))
        : [];
      assert.deepEqual(memberships, expected);
      if (admin) {
        const [flags] = await pgs.query(
          `SELECT bool_or(m.inherit_option) AS inherit, bool_or(m.set_option) AS set FROM pg_auth_members m
             JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member
            WHERE r.rolname = 'broker' AND g.rolname IN ('app_readers', 'app_migrators')`);
        assert.deepEqual(flags, { inherit: false, set: false }, 'the broker neither inherits nor can SET ROLE to the groups');

        // The creators: NOLOGIN CREATEROLE roles the broker may SET ROLE to (never inherit from),
        // each able to hand out the marker (ADMIN only), and no group before a policy maps onto it.
        const { names, roles, edges } = await creatorGrants(b);
        assert.deepEqual(roles, names.map((rolname) => ({ rolname, rolsuper: false, rolcreaterole: true, rolcanlogin: false, rolcreatedb: false, rolbypassrls: false, rolreplication: false })));
        assert.deepEqual(edges, creatorEdges(names, [b.config.managedRole]));
      }

      const adminToken = await b.adminToken();
      const put = (grantRole: string) => api(b, 'PUT', '/policies/lp', adminToken, { issuer: b.issuer.issuer, claims: { sub: 'lp:*' }, grant_role: grantRole, database: pgs.database });
      // Escalation paths are refused with the reason; a plain group role is accepted.
      await pgs.query(`CREATE ROLE lp_super SUPERUSER NOLOGIN`);
      await pgs.query(`CREATE ROLE lp_inherits_super NOLOGIN IN ROLE lp_super`);
      await pgs.query(`CREATE ROLE lp_inherits_program NOLOGIN IN ROLE pg_execute_server_program`);
      await pgs.query(`CREATE ROLE lp_creator NOLOGIN CREATEROLE`);
      await pgs.query(`CREATE ROLE lp_nested NOLOGIN IN ROLE lp_inherits_program`);
      const refused: Array<[string, RegExp]> = [
        ['pg_execute_server_program', /predefined PostgreSQL role/],
        ['lp_super', /has SUPERUSER/],
        ['lp_inherits_super', /inherits from lp_super, which has SUPERUSER/],
        ['lp_inherits_program', /inherits from pg_execute_server_program, which is a predefined/],
        ['lp_nested', /inherits from pg_execute_server_program/],
        ['lp_creator', /has CREATEROLE/],
        ['broker', /SUPERUSER|CREATEROLE|can log in/],
        [b.config.managedRole, /marker role/],
        ['no_such_role', /does not exist/],
      ];
      for (const [role, reason] of refused) {
        const res = await put(role);
        assert.equal(res.status, 400, `${role}: ${JSON.stringify(res.body)}`);
        assert.equal(res.body.code, 'INVALID_POLICY');
        assert.match(res.body.detail, reason, role);
      }
      const ok = await put('app_readers');
      assert.equal(ok.status, 201, JSON.stringify(ok.body));
      if (admin) {
        // Storing the policy handed its group on to the creators, ADMIN only; app_migrators, which
        // no policy names, stays out of their reach.
        const { names, edges } = await creatorGrants(b);
        assert.deepEqual(edges, creatorEdges(names, ['app_readers', b.config.managedRole]));
        // A group the broker may not grant is refused with the GRANT that would fix it.
        await pgs.query('CREATE ROLE lp_ungranted NOLOGIN');
        const refusedGroup = await put('lp_ungranted');
        assert.equal(refusedGroup.status, 400);
        assert.match(refusedGroup.body.detail, /holds no ADMIN OPTION on grant_role lp_ungranted.*GRANT lp_ungranted TO broker WITH ADMIN OPTION/);
      }

      // The non-superuser broker can issue, and the credential works on this server version.
      const issued = await b.issue(await b.token({ sub: 'lp:ci' }));
      assert.equal(issued.status, 201, JSON.stringify(issued.body));
      // While the lease lives, neither the broker nor any creator is a plain member of the issued
      // role: 16+ only its creator holds ADMIN OPTION on it, 15 nobody. Teardown takes membership.
      const members = await pgs.query(
        `SELECT r.rolname AS member, m.admin_option AS admin${admin ? ', m.inherit_option AS inherit' : ''} FROM pg_auth_members m
           JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member WHERE g.rolname = $1`, [issued.body.username]);
      if (admin) {
        assert.equal(members.length, 1, JSON.stringify(members));
        assert.ok(creatorNames(b.config.managedRole).includes(members[0].member), JSON.stringify(members));
        assert.deepEqual({ admin: members[0].admin, inherit: members[0].inherit }, { admin: true, inherit: false });
      } else {
        assert.deepEqual(members, []);
      }
      const client = await connectAs(pgs, issued.body);
      const { rows } = await client.query('SELECT count(*)::int AS n FROM public.widgets');
      assert.ok(rows[0].n > 0);
      await client.end();
      // ...and revoke: terminate, drop owned, drop role, all without SUPERUSER.
      const revoked = await api(b, 'DELETE', `/leases/${issued.body.lease_id}`, adminToken);
      assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
      assert.equal((await pgs.query(`SELECT 1 FROM pg_roles WHERE rolname = $1`, [issued.body.username])).length, 0);
    } finally {
      await b.close();
      await pgs.stop();
    }
  };
}

describe('the broker runs as a non-superuser with exactly the documented grants', () => {
  test('PostgreSQL 18 (embedded)', suite('embedded'));
  test('PostgreSQL 15 (Debian postgresql-15)', { skip: PG15 ? false : 'postgresql-15 is not installed (.ci/run installs it)' }, suite('pg15'));
});

test('a creator role name already taken by a role the broker may not manage stops start-up with a clear error (16+)', async () => {
  const pgs = await startPostgres();
  try {
    const [taken] = creatorNames('lp_marker').slice(3, 4);
    await pgs.query(`CREATE ROLE ${taken} NOLOGIN`, [], 'postgres');
    await assert.rejects(migrate(pgs.brokerUrl, 'lp_marker', createLogger('silent')),
      new RegExp(`cannot set up creator role ${taken}: permission denied.*drop it, or let the broker create it`));
    await pgs.query(`DROP ROLE ${taken}`, [], 'postgres');
    await migrate(pgs.brokerUrl, 'lp_marker', createLogger('silent'));
    const made = await pgs.query(`SELECT count(*)::int AS n FROM pg_roles WHERE rolname = ANY($1)`, [creatorNames('lp_marker')]);
    assert.deepEqual(made, [{ n: CREATOR_COUNT }]);
  } finally {
    await pgs.stop();
  }
});
