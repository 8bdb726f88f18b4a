import net from 'node:net';
import pg from 'pg';
import { startPostgres } from '../test/helpers/postgres.js';
const pgs = await startPostgres(process.env.PG15 ? { flavor: 'pg15' } as any : undefined);
await pgs.query(`CREATE ROLE probe_user LOGIN PASSWORD 'pw'`);
function stall(user: string): Promise<net.Socket> {
  return new Promise((resolve) => {
    const s = net.connect(pgs.port, pgs.host, () => {
      const kv = Buffer.from(`user\0${user}\0database\0${pgs.database}\0\0`);
      const head = Buffer.alloc(8); head.writeInt32BE(8 + kv.length, 0); head.writeInt32BE(196608, 4);
      s.write(Buffer.concat([head, kv]));
    });
    s.once('data', () => resolve(s));
    s.on('error', () => undefined);
  });
}
const sock = await stall('probe_user');
const delayed = new pg.Client({ host: pgs.host, port: pgs.port, database: pgs.database, user: 'probe_user', password: 'pw', options: '-c post_auth_delay=3' });
const p = delayed.connect().catch((e) => console.log('delayed err', e.message));
await new Promise((r) => setTimeout(r, 800));
console.log(JSON.stringify(await pgs.query(`SELECT l.pid, a.pid AS apid, a.datid, a.usesysid, a.backend_type, a.state, a.wait_event_type, a.wait_event FROM pg_locks l LEFT JOIN pg_stat_get_activity(NULL) a ON a.pid = l.pid
      WHERE l.locktype = 'virtualxid' AND l.granted AND l.pid <> pg_backend_pid()`), null, 1));
console.log(JSON.stringify(await pgs.query(`SELECT pid, backend_type, state, wait_event_type, wait_event, usename FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()`)));
sock.destroy();
await p; await delayed.end().catch(() => {});
await pgs.stop();
