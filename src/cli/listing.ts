import { Option, type Command } from 'commander';
import { CliError, DEFAULT_BROKER_URL } from './client.js';
import { shellQuote } from './formats.js';
import { printLines } from './output.js';
import { maxWaitSeconds, RateLimitedOut, RateLimitPacer } from './rate-limit.js';

/**
 * A filter option of a listing. Its query parameter is its name in snake case (`--lease-id` sends
 * `lease_id`), so a filter the broker gains is one line here, and what is sent, the hint and the
 * help cannot disagree.
 */
export interface Filter {
  flags: string;
  description?: string;
}

export interface ListingOptions {
  json?: boolean;
  ndjson?: boolean;
  all?: boolean;
}

interface Page<T> {
  items: T[];
  next_cursor: string | null;
}

/** With --all and no --limit, pages as large as the broker gives: fewer calls for a whole export. */
const ALL_PAGE_SIZE = '1000';

export function addListingOptions(cmd: Command, filters: readonly Filter[]): Command {
  for (const f of filters) cmd.option(f.flags, f.description);
  return cmd
    .option('--limit <n>', 'at most this many per page (1–1000; the broker\'s default is 100); with --all, per call')
    .option('--cursor <cursor>', 'the page after the one that printed this cursor; with --all, every page from there on')
    .option('--all', 'follow the pages to the end and print them all; waits out the broker\'s rate limit (429) as it asks')
    .option('--json', 'JSON output: the page as the broker sends it ({"items": […], "next_cursor": …}); with --all, one document of them all');
}

function queryParameter(option: Option): string {
  return (option.long ?? '').replace(/^--/, '').replace(/-/g, '_');
}

/** The query for the filters, --limit and --cursor given on the command line. */
export function listingQuery(cmd: Command, filters: readonly Filter[]): URLSearchParams {
  const names = new Set([...filters.map((f) => new Option(f.flags).long), '--limit', '--cursor']);
  const query = new URLSearchParams();
  for (const option of cmd.options) {
    if (!names.has(option.long)) continue;
    const value: unknown = cmd.getOptionValue(option.attributeName());
    if (typeof value === 'string') query.set(queryParameter(option), value);
  }
  return query;
}

function shellWord(value: string): string {
  return /^[\w@%+=:,./-]+$/.test(value) ? value : shellQuote(value);
}

/**
 * The command that lists the next page: the one that ran, with every option given on its command
 * line except the token (a secret, and not needed to say which page), and the broker's cursor.
 * The cursor alone, without the filters, lists the next page of everything.
 */
export function nextPageCommand(cmd: Command, cursor: string, base?: string): string {
  const path: string[] = [];
  for (let c: Command | null = cmd; c?.parent; c = c.parent) path.unshift(c.name());
  const words = ['pg-broker', ...path];
  for (const option of cmd.options) {
    const key = option.attributeName();
    if (key === 'token' || key === 'cursor' || cmd.getOptionValueSource(key) !== 'cli') continue;
    const value: unknown = cmd.getOptionValue(key);
    const flag = option.long ?? option.short!;
    if (value === true) words.push(flag);
    else if (typeof value === 'string') words.push(flag, shellWord(value));
  }
  // A broker found through PG_BROKER_URL is named too: run in another shell, the command would
  // otherwise ask another broker (or the default) with this one's cursor.
  if (base !== undefined && cmd.getOptionValueSource('url') !== 'cli' && base !== DEFAULT_BROKER_URL) words.push('--url', shellWord(base));
  words.push('--cursor', shellWord(cursor));
  return words.join(' ');
}

/**
 * A value as one cell of a tab-separated row. Control characters are escaped: a tab or newline in
 * a reason would split the row, and a subject may come from a token that failed verification,
 * whose escape sequences must not reach the admin's terminal.
 */
export function cell(value: unknown): string {
  if (value === null || value === undefined || value === '') return '-';
  return String(value).replace(/[\u0000-\u001f\u007f-\u009f\\]/g, (c) => {
    const named: Record<string, string> = { '\t': '\\t', '\n': '\\n', '\r': '\\r', '\\': '\\\\' };
    return named[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
  });
}

/**
 * Prints a listing of `path` in the form asked for. One page unless --all; when there are more,
 * the command for the next page goes to stderr, so a script reading stdout gets only rows.
 */
export async function printListing<T>(
  cmd: Command, filters: readonly Filter[], base: string, token: string, path: string,
  opts: ListingOptions, row: (item: T) => string, noun: string,
): Promise<void> {
  const query = listingQuery(cmd, filters);
  if (opts.all && !query.has('limit')) query.set('limit', ALL_PAGE_SIZE);
  const pacer = new RateLimitPacer(maxWaitSeconds());
  const kept: T[] = [];
  const seen = new Set<string>();
  let count = 0;
  let pages = 0;
  let next: string | null;
  do {
    let body: Page<T>;
    try {
      body = await pacer.get<Page<T>>(base, token, String(query) ? `${path}?${query}` : path);
    } catch (err) {
      if (err instanceof RateLimitedOut) throw new CliError(`${err.message}; ${stoppedAt(cmd, base, opts, query.get('cursor'), pages, count, noun)}`, 1, 429, err.code);
      throw err;
    }
    next = body.next_cursor;
    count += body.items.length;
    pages += 1;
    if (opts.json && !opts.all) {
      await printLines([JSON.stringify(body, null, 2)]);
    } else if (opts.json) {
      kept.push(...body.items);
    } else {
      // Printed page by page: an export of every event need not fit in memory first.
      // False once the reader has gone (| head): the rest would be fetched for nobody.
      if (!(await printLines(body.items.map((item) => (opts.ndjson ? JSON.stringify(item) : row(item)))))) return;
    }
    if (!opts.all || !next) break;
    // Any cursor seen before, not only the last one: A, B, A would loop as surely as A, A.
    if (seen.has(next)) throw new CliError(`the broker at ${base} answered ${path} with a cursor it had given before; stopped rather than loop`);
    seen.add(next);
    query.set('cursor', next);
  } while (next);
  if (opts.json && opts.all) await printLines([JSON.stringify({ items: kept, next_cursor: null }, null, 2)]);
  if (next && !opts.all) process.stderr.write(`(more: ${nextPageCommand(cmd, next, base)})\n`);
  // On stderr, so a script reading the rows gets none; a person is told the filters matched nothing.
  else if (count === 0 && !opts.json) process.stderr.write(`no ${noun} match\n`);
}

/**
 * What a listing that gave up had written, and how to go on from the page it could not get: the
 * rows already on stdout stay there, so the resumed command appends (>>) rather than repeats them.
 */
function stoppedAt(cmd: Command, base: string, opts: ListingOptions, cursor: string | null, pages: number, count: number, noun: string): string {
  const read = `${pages} ${pages === 1 ? 'page' : 'pages'} (${count} ${noun})`;
  // The document is printed only once whole: a part of it would read as all there is.
  if (opts.json && opts.all) return `nothing was written (${read} read): with --json --all the document is printed only once whole; run the command again later`;
  if (pages === 0) return 'nothing was written; run the command again later';
  return `${read} written; to resume from there: ${nextPageCommand(cmd, cursor!, base)}`;
}
