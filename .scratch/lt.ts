import { startPostgres } from '../test/helpers/postgres.js';
const pgs = await startPostgres();
for (const v of ['0', '10s', '500ms', '2min']) {
  const r = await pgs.query(`SELECT set_config('lock_timeout', '${v}', false) AS x, (SELECT pg_catalog.set_config('lock_timeout', CASE WHEN s::interval = '0' OR s::interval > $1::text::interval THEN $1::text ELSE s END, true) FROM pg_catalog.current_setting('lock_timeout') AS t(s)) AS y`, ['1s']);
  console.log(v, r);
}
await pgs.stop();
