import net from 'node:net';

/**
 * Ask the kernel for a currently free TCP port on `host`.
 *
 * The port is released before it is returned, so another process can grab it
 * in between: callers that hand it to an external server must retry on
 * "address in use" rather than trust it blindly.
 */
export function freePort(host = '127.0.0.1'): Promise<number> {
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
