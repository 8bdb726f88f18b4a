import { fork, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { compiledEntries } from './bundle.js';
import { ROOT } from './settings.js';

/** A broker in its own process (bench/broker-process.ts, compiled: see bundle.ts), driven over IPC. */
export class BrokerChild {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  private readonly stderr: string[] = [];

  private constructor(private readonly child: ChildProcess, readonly url: string) {}

  get pid(): number {
    return this.child.pid!;
  }

  /** `entry`: another compiled bench/broker-process.ts (e.g. an older commit's), for A/B runs. */
  static async start(env: Record<string, string>, options: { timeoutMs?: number; nodeFlags?: string[]; entry?: string } = {}): Promise<BrokerChild> {
    const { timeoutMs = 60_000, nodeFlags = [] } = options;
    const child = fork(options.entry ?? (await compiledEntries()).broker, [], {
      cwd: ROOT,
      // Not the bench's own flags, which load tsx: the broker runs on plain node, as in production
      // (nodeFlags only for a profiler's needs).
      execArgv: nodeFlags,
      env,
      // JSON logs go nowhere, as they would to a log shipper; pino still formats every line.
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
    });
    const stderr: string[] = [];
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr.push(...chunk.toString().split('\n').filter(Boolean));
      if (stderr.length > 200) stderr.splice(0, stderr.length - 200);
    });
    const url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`broker not ready after ${timeoutMs} ms: ${stderr.slice(-5).join(' | ')}`)), timeoutMs);
      child.on('message', (msg: { ready?: string }) => {
        if (msg.ready) {
          clearTimeout(timer);
          resolve(msg.ready);
        }
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`broker exited with ${code} during start: ${stderr.slice(-5).join(' | ')}`));
      });
    });
    const broker = new BrokerChild(child, url.replace('0.0.0.0', '127.0.0.1'));
    broker.stderr.push(...stderr);
    child.on('message', (msg: { id?: number; ok?: boolean; result?: unknown; error?: string }) => {
      if (msg.id === undefined) return;
      const waiter = broker.pending.get(msg.id);
      if (!waiter) return;
      broker.pending.delete(msg.id);
      if (msg.ok) waiter.resolve(msg.result);
      else waiter.reject(new Error(msg.error));
    });
    child.on('exit', (code) => {
      for (const waiter of broker.pending.values()) waiter.reject(new Error(`broker exited with ${code}: ${stderr.slice(-5).join(' | ')}`));
      broker.pending.clear();
    });
    return broker;
  }

  request<T = unknown>(cmd: string, extra: Record<string, unknown> = {}): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.child.send({ id, cmd, ...extra });
    });
  }

  async close(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = once(this.child, 'exit');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 15_000);
    this.request('close').catch(() => undefined);
    await exited;
    clearTimeout(timer);
  }

  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }
}
