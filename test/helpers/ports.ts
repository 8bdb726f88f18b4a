import { readFileSync } from 'node:fs';
import { freePort as kernelPort, portIsFree } from '../../src/dev/ports.js';

/**
 * The first port of the kernel's ephemeral range, or null where it cannot be read. Every outgoing
 * connection the suite makes (hundreds a second: pools, probes, fetches) takes a port from that
 * range, as does a listener on port 0, so a port chosen there and handed to a server a second
 * later can be gone by the time it binds: a CI run lost a broker's port that way.
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
 * A port free on `host` now, for a server a test starts later with it. Chosen at random below the
 * ephemeral range where there is room, so only another test's chosen port can collide with it,
 * not the suite's own outgoing connections; elsewhere the kernel picks one as before.
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
