import { isIP } from 'node:net';
import type { FastifyRequest } from 'fastify';

declare module 'fastify' {
  interface FastifyRequest {
    /** The caller's address as the per-IP limit, the audit, leases and the request log take it (clientAddress). */
    clientIp: string | undefined;
  }
}

/**
 * request.ip when it is an IP address. Behind a listed proxy request.ip is the X-Forwarded-For
 * entry at the client's position, and proxy-addr returns that entry as it stands, address or not:
 * a proxy that passes a client's header on rather than appending to it lets the client put any
 * text there (`unknown`, `1.2.3.4:5678`, markup, kilobytes of it), which would land in client_ip
 * and the log, and buy a fresh per-IP allowance with each new text. The nearest hop that is an
 * address stands in instead: the listed proxy that passed the text on (the connection's peer
 * when there is one proxy).
 */
export function clientAddress(request: FastifyRequest): string | undefined {
  // isIP also takes an IPv6 zone id (`%` and any length of letters, digits, '.', '-', ':'): it
  // names an interface of the host that wrote it, nothing of the client's, and is left out.
  const ip = request.ip;
  if (ip !== undefined && isIP(ip) !== 0) return ip.replace(/%.*$/s, '');
  // [peer, …listed proxies, the entry at the client's position]; every entry but the last is an address.
  const hops = request.ips ?? [];
  return hops.length >= 2 ? hops[hops.length - 2] : request.socket?.remoteAddress;
}
