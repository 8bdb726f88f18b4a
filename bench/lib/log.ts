/** Progress lines on stderr, stamped with the time since the bench started. */

const t0 = Date.now();
export function log(message: string): void {
  process.stderr.write(`[bench +${((Date.now() - t0) / 1000).toFixed(1)}s] ${message}\n`);
}

/** Seconds since the bench started. */
export function elapsedSeconds(): number {
  return (Date.now() - t0) / 1000;
}
