import { readFileSync } from 'node:fs';
import net from 'node:net';

/** A currently free TCP port on `host`, as the kernel picks one for a listener on port 0. */
function kernelPort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen({ host, port: 0, exclusive: true }, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new Error('freePort: no port assigned'))));
    });
  });
}

/**
 * The first port of the kernel's ephemeral range, or null where it cannot be read. Every outgoing
 * connection (pools, probes, fetches) takes a port from that range, as does a listener on port 0,
 * so a port chosen there and handed to a server a second later can be gone by the time it binds:
 * a CI run of the tests lost a broker's port that way.
 */
function ephemeralStart(): number | null {
  try {
    const [low] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    return Number.isInteger(low) ? low : null;
  } catch {
    return null;
  }
}

const LOWEST = 20_000;

/**
 * A TCP port free on `host` now, for a server started with it later. It is released before it is
 * returned, so callers that hand it to another process must still retry on "address in use".
 * Chosen at random below the ephemeral range where there is room, so that only another chosen
 * port can take it in the meantime, not one of the machine's outgoing connections; elsewhere the
 * kernel picks one.
 */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  const high = ephemeralStart();
  if (high === null || high - LOWEST < 1000) return kernelPort(host);
  for (let i = 0; i < 50; i++) {
    const port = LOWEST + Math.floor(Math.random() * (high - LOWEST));
    if (await portIsFree(host, port)) return port;
  }
  return kernelPort(host);
}

/**
 * False only when something already listens on host:port. Other bind errors (e.g. EACCES for a
 * privileged port) count as free, so that the server that really binds it reports them itself.
 */
export function portIsFree(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', (e: NodeJS.ErrnoException) => resolve(e.code !== 'EADDRINUSE'));
    srv.listen({ host, port, exclusive: true }, () => srv.close(() => resolve(true)));
  });
}
