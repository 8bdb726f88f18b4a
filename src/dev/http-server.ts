import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export interface SmallServer {
  port: number;
  close(): Promise<void>;
}

/**
 * A plain HTTP server whose close() also destroys open sockets: keep-alive connections, or a
 * request deliberately left hanging, would otherwise keep close() (and the process) waiting.
 */
export async function listenHttp(handler: http.RequestListener, host = '127.0.0.1', port = 0): Promise<SmallServer> {
  const server = http.createServer(handler);
  const sockets = new Set<Socket>();
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      }),
  };
}
