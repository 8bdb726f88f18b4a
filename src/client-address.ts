import { isIPv4, isIPv6 } from 'node:net';

/**
 * What the per-IP rate limit counts a request against. An IPv4 address is itself; an IPv6
 * address is its /64, the block one host or one customer usually holds whole: counted one by
 * one, a single machine could send from 2^64 addresses, each with a fresh allowance (and a fresh
 * token.rejected audit event for every bad token). An IPv4 address mapped into IPv6 is the IPv4
 * address, so a dual-stack listener counts it as the same client.
 */
export function rateLimitKey(ip: string): string {
  const address = ip.replace(/%.*$/, '');
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped && isIPv4(mapped[1])) return mapped[1];
  if (!isIPv6(address)) return address;
  return `${expandIPv6(address).slice(0, 4).join(':')}::/64`;
}

/** The eight 16-bit groups of an IPv6 address, as lower-case hex without leading zeros. */
function expandIPv6(address: string): string[] {
  // A trailing dotted IPv4 part (::1.2.3.4) is two groups.
  const dotted = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(address);
  const text = dotted
    ? address.slice(0, dotted.index) + [[1, 2], [3, 4]].map(([a, b]) => ((Number(dotted[a]) << 8) | Number(dotted[b])).toString(16)).join(':')
    : address;
  const [head, tail] = text.includes('::') ? text.split('::') : [text, null];
  const left = head ? head.split(':') : [];
  const right = tail ? tail.split(':') : [];
  const zeros = tail === null ? [] : Array(8 - left.length - right.length).fill('0');
  return [...left, ...zeros, ...right].map((g) => parseInt(g, 16).toString(16));
}
