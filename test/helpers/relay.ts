import net from 'node:net';
import { startPostgres, type TestPostgres } from './postgres.js';

/**
 * A TCP relay on 127.0.0.1 in front of a real server, for outages nothing in the request path
 * fakes. While `refusing`, new connections are cut at once (cut() also ends the open ones, as a
 * restart or a network blip does); while `silent`, connections stay open and every byte is
 * dropped, as with a server that stops answering without closing anything.
 */
export interface Relay {
  url: string;
  port: number;
  /** Connections cut while refusing. */
  refused: number;
  refusing: boolean;
  silent: boolean;
  cut(): void;
  close(): Promise<void>;
}

export async function startRelay(targetPort: number, targetHost = '127.0.0.1'): Promise<Relay> {
  const sockets = new Set<net.Socket>();
  const track = (s: net.Socket) => {
    sockets.add(s);
    s.on('error', () => undefined);
    s.on('close', () => sockets.delete(s));
  };
  const server = net.createServer((client) => {
    track(client);
    if (state.refusing) {
      state.refused += 1;
      client.destroy();
      return;
    }
    if (state.silent) return;
    const upstream = net.connect(targetPort, targetHost);
    track(upstream);
    client.on('data', (d) => { if (!state.silent) upstream.write(d); });
    upstream.on('data', (d) => { if (!state.silent) client.write(d); });
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  const state: Relay = {
    url: `http://127.0.0.1:${port}`,
    port,
    refused: 0,
    refusing: false,
    silent: false,
    cut() {
      state.refusing = true;
      for (const s of sockets) s.destroy();
    },
    close: () => new Promise<void>((r) => {
      server.close(() => r());
      for (const s of sockets) s.destroy();
    }),
  };
  return state;
}

/** A PostgreSQL of its own with a relay in front; `url` reaches its broker database through the relay. */
export interface RelayedPostgres {
  pgs: TestPostgres;
  relay: Relay;
  url: string;
  stop(): Promise<void>;
}

export async function startRelayedPostgres(): Promise<RelayedPostgres> {
  const pgs = await startPostgres();
  const relay = await startRelay(pgs.port);
  const url = new URL(pgs.brokerUrl);
  url.port = String(relay.port);
  return {
    pgs, relay, url: url.toString(),
    async stop() {
      await relay.close();
      await pgs.stop();
    },
  };
}
