import { BlockList, isIPv4, isIPv6 } from 'node:net';

// What a single setting's value may look like (hosts, URLs), apart from which variable holds it.

// RFC 1123 labels, plus the underscore that resolvers accept and Docker and compose service
// names use (`my_db`). A name whose last label is all digits is a malformed IPv4 address
// (`10.0.0.256`, `1.2.3`), not a name.
const HOST_LABEL = /^(?!-)[a-z0-9_-]{1,63}(?<!-)$/i;

/**
 * `host` as clients get it (in `host`, and in `uri`, where a colon means IPv6 and is bracketed),
 * or null when it is more than a bare name or address: a port, scheme, path, userinfo or space
 * would make a uri that points elsewhere or does not parse. An IPv6 address may come bracketed
 * and loses its brackets, as libpq's PGHOST wants. A zone id (`%eth0`) names an interface of the
 * broker's machine, not the client's, so it is refused.
 */
export function publicHostOrNull(host: string): string | null {
  const bare = host.replace(/^\[(.*)\]$/, '$1');
  if (bare !== host || bare.includes(':')) return isIPv6(bare) && !bare.includes('%') ? bare : null;
  return isIPv4(host) || isHostName(host) ? host : null;
}

function isHostName(host: string): boolean {
  // A fully qualified name may end in the root's dot (`db.example.com.`), as Kubernetes' often do.
  const labels = host.replace(/\.$/, '').split('.');
  return host.length <= 253 && labels.every((l) => HOST_LABEL.test(l)) && !/^\d+$/.test(labels[labels.length - 1]);
}

/**
 * HOST as Node's listen() wants it, or null when it is no IP address or host name. Unlike a
 * public host, an IPv6 zone id (`fe80::1%eth0`) is fine: it names an interface of this machine.
 */
export function listenHostOrNull(host: string): string | null {
  const bare = host.replace(/^\[(.*)\]$/, '$1');
  if (bare !== host || bare.includes(':')) return isIPv6(bare) ? bare : null;
  return isIPv4(host) || isHostName(host) ? host : null;
}

/**
 * Why one entry of BROKER_TRUST_PROXY is no proxy address or CIDR block, or null. Stricter than
 * proxy-addr, which Fastify hands the list to: it reads `010.0.0.1` as octal (8.0.0.1) and
 * `10.1` as 10.0.0.1, and would trust addresses the operator never meant.
 */
export function proxyRangeProblem(entry: string): string | null {
  const [address, prefix, extra] = entry.split('/');
  const family = isIPv4(address) ? 4 : isIPv6(address) ? 6 : 0;
  // A zone id names an interface of this machine, and proxy-addr does not match on it.
  if (family === 0 || address.includes('%') || extra !== undefined) return 'is not an IP address or CIDR block (such as 10.0.0.0/8 or fd00::/8)';
  if (prefix === undefined) return null;
  const max = family === 4 ? 32 : 128;
  if (/^0+$/.test(prefix)) return 'is a /0 block, which trusts every address: any client could then choose its own address';
  if (!/^\d{1,3}$/.test(prefix) || Number(prefix) > max) return `has no valid prefix length: an IPv${family} block's is 1 to ${max}`;
  const bits = Number(prefix);
  // proxy-addr matches an IPv4 peer against IPv6 blocks through its ::ffff: form, so
  // ::ffff:0:0/96 trusts every IPv4 client; and /1 blocks, two of them, cover all of IPv4.
  if (bits < WIDEST_PROXY_BLOCK) return `is a /${bits} block: proxies sit in a /${WIDEST_PROXY_BLOCK} or narrower, and a wider block lets most clients choose their own address`;
  if (family === 6 && bits < 96 + WIDEST_PROXY_BLOCK && touchesMappedIpv4(address, bits)) {
    return `covers IPv4 addresses (as ::ffff:…) wider than a /${WIDEST_PROXY_BLOCK}, which lets most IPv4 clients choose their own address`;
  }
  // proxy-addr masks the address to its prefix, so `192.168.1.10/24` trusts all of 192.168.1.0/24:
  // most likely one proxy's address was meant, and a block's worth of clients could then name
  // their own address. Which of the two was meant only the operator knows, so both are offered.
  const hostBits = (1n << BigInt(max - bits)) - 1n;
  const value = addressValue(address, family);
  if ((value & hostBits) !== 0n) {
    const block = `${formatAddress(value & ~hostBits, family)}/${bits}`;
    return `has host bits set, and would trust all of ${block}: write ${block} for that /${bits} block, `
      + `or ${address} (or ${address}/${max}) for the one proxy`;
  }
  return null;
}

/** The address as a number: IPv4 in 32 bits, IPv6 (an embedded IPv4 tail included) in 128. */
function addressValue(address: string, family: 4 | 6): bigint {
  if (family === 4) return address.split('.').reduce((n, octet) => (n << 8n) | BigInt(octet), 0n);
  // A dotted IPv4 tail (`::ffff:10.0.0.1`) is two groups; `::` stands for as many zero groups as are missing.
  const groups = address.replace(/(\d+)\.(\d+)\.(\d+)\.(\d+)$/, (_m, a, b, c, d) =>
    `${((+a << 8) | +b).toString(16)}:${((+c << 8) | +d).toString(16)}`);
  const [head, tail] = groups.split('::');
  const left = head ? head.split(':') : [];
  const right = tail === undefined ? [] : tail ? tail.split(':') : [];
  const all = tail === undefined ? left : [...left, ...Array(8 - left.length - right.length).fill('0'), ...right];
  return all.reduce((n, group) => (n << 16n) | BigInt(`0x${group}`), 0n);
}

/** An address as it is usually written: IPv4 dotted, IPv6 as RFC 5952 says, ::ffff: with its IPv4 part dotted. */
function formatAddress(value: bigint, family: 4 | 6): string {
  const ipv4 = (n: bigint) => [24n, 16n, 8n, 0n].map((shift) => (n >> shift) & 255n).join('.');
  if (family === 4) return ipv4(value);
  if (value >> 32n === 0xffffn) return `::ffff:${ipv4(value & 0xffffffffn)}`;
  const hex = Array.from({ length: 8 }, (_, i) => ((value >> BigInt(112 - 16 * i)) & 0xffffn).toString(16)).join(':');
  // WHATWG URL serialises IPv6 hosts as RFC 5952 does: the longest run of zero groups becomes ::.
  return new URL(`http://[${hex}]`).hostname.slice(1, -1);
}

const WIDEST_PROXY_BLOCK = 8;
const MAPPED_IPV4 = new BlockList();
MAPPED_IPV4.addSubnet('::ffff:0:0', 96, 'ipv6');

/** Whether an IPv6 block overlaps ::ffff:0:0/96, where IPv4 addresses are written as IPv6. */
function touchesMappedIpv4(address: string, bits: number): boolean {
  const block = new BlockList();
  block.addSubnet(address, bits, 'ipv6');
  return MAPPED_IPV4.check(address, 'ipv6') || block.check('::ffff:0:0', 'ipv6');
}

export const PUBLIC_HOST_RULE = 'a host name, an IPv4 address or an IPv6 address, with no port, scheme, path or user';

/** No query, fragment or user part (an `@` further on, in the path, is no user part). */
export function plainIssuer(issuer: string): boolean {
  const url = new URL(issuer);
  return !url.username && !url.password && !url.search && !url.hash && !/[?#]/.test(issuer);
}

export function isUrl(value: unknown): boolean {
  if (typeof value !== 'string') return false;
  try {
    const url = new URL(value);
    return (url.protocol === 'https:' || url.protocol === 'http:') && url.host !== '';
  } catch {
    return false;
  }
}

/** 127.0.0.0/8, ::1 and the name localhost: traffic to them never leaves the machine. */
function isLoopbackHost(hostname: string): boolean {
  // WHATWG URL has already normalised the host: lowercase, IPv4 in dotted decimal, IPv6 bracketed.
  const host = hostname.replace(/^\[(.*)\]$/, '$1');
  return host === 'localhost' || host === '::1' || (isIPv4(host) && host.startsWith('127.'));
}

/** An http:// URL to a host other than loopback, where anyone on the path can change the answer. */
export function isPlainHttpOverNetwork(value: string): boolean {
  const url = new URL(value);
  return url.protocol === 'http:' && !isLoopbackHost(url.hostname);
}

/**
 * Why an issuer or jwks_uri that parses is still no usable URL, or null. WHATWG URL forgives what
 * an exact comparison with a token's `iss` does not, and what the operator did not mean:
 * `https:///a` parses as https://a/, and `https://a.example;https://b` (a `;` typed for a comma)
 * as one URL whose host is `a.example;https`.
 */
export function urlProblem(field: string, value: string): string | null {
  if (!/^https?:\/\/[^/\\?#@\s]/i.test(value)) return `${field} must have its host right after "//"`;
  if (value.indexOf('://') !== value.lastIndexOf('://')) return `${field} holds two URLs; separate issuers with a comma`;
  const { hostname } = new URL(value);
  if (publicHostOrNull(hostname) === null) return `${field} has ${JSON.stringify(hostname)} as its host, which is not a host name or IP address`;
  return null;
}
