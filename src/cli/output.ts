import { fstatSync, writeSync } from 'node:fs';
import { CliError } from './client.js';

/**
 * `text` to standard output, failing unless all of it got there. To a file, Node's stream writes
 * once and takes a short count (a disk filling up) for success: written here byte count by byte
 * count, the next write after a short one fails (ENOSPC, EFBIG). Elsewhere the stream's write is
 * awaited: a reader that has already gone (a closed pipe) fails it. Bytes a live reader buffered
 * but never read are beyond telling, as for any writer.
 */
export async function writeWholly(text: string): Promise<void> {
  if (fstatSync(1).isFile()) {
    const bytes = Buffer.from(text);
    for (let done = 0; done < bytes.length;) {
      const wrote = writeSync(1, bytes, done, bytes.length - done);
      if (wrote === 0) throw Object.assign(new Error('nothing could be written'), { code: 'ENOSPC' });
      done += wrote;
    }
    return;
  }
  await new Promise<void>((resolve, reject) => process.stdout.write(text, (err) => (err ? reject(err) : resolve())));
}

/**
 * Lines of a command's output, each ending in a newline. A listing sent to a file (an audit's
 * `leases list --json > leases.json`) that does not all get there fails the command rather than
 * leaving a cut-off file behind an exit status of 0. A reader that has gone (`| head -1`) took
 * what it wanted: the command ends as it would have. False when the reader has gone, so a listing
 * of many pages stops fetching them.
 */
export async function printLines(lines: string[]): Promise<boolean> {
  if (!lines.length) return true;
  try {
    await writeWholly(lines.map((line) => `${line}\n`).join(''));
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EPIPE') return false;
    throw new CliError(`cannot write to standard output: ${code ?? (err as Error).message}`);
  }
}
