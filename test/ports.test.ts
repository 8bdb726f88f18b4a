import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { test } from 'node:test';
import { freePort } from './helpers/ports.js';

const [ephemeralLow] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);

test('freePort gives ports outside the kernel\'s ephemeral range that a server can then bind', async () => {
  const ports = await Promise.all(Array.from({ length: 20 }, () => freePort()));
  for (const port of ports) assert.ok(port >= 20_000 && port < ephemeralLow, `port ${port} is below ${ephemeralLow}`);
  assert.ok(new Set(ports).size > 1, 'chosen at random, not one fixed port');
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(ports[0], '127.0.0.1', resolve));
  assert.equal((server.address() as net.AddressInfo).port, ports[0]);
  await new Promise((resolve) => server.close(resolve));
});
