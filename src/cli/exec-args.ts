import { Command, type Option } from 'commander';

/*
 * exec passes every word from the command's first on to the command (passThroughOptions), so
 * `exec psql -h db -Atc …` runs psql. Before that, commander read exec's own options anywhere on
 * the line, and scripts were written that way: `exec ./migrate.sh --token "$T" --url …` would now
 * run with the ambient token and URL (another identity, another broker) and hand --token and its
 * value to the command, where ps shows them. So without a -- before the command, a word after it
 * that commander would read as one of exec's options is refused before anything is issued.
 */

function takesValue(option: Option): boolean {
  return option.required || option.optional;
}

/** `word` is the option's flag itself, as commander's (untyped) Option.is has it. */
function isFlag(option: Option, word: string): boolean {
  return option.long === word || option.short === word;
}

/** The option of exec's that commander would read `word` as (`--url`, `--url=…`, `-x…`), if any. */
function ownOption(options: readonly Option[], word: string): Option | undefined {
  const exact = options.find((o) => isFlag(o, word));
  if (exact) return exact;
  const long = /^(--[^=]+)=/.exec(word);
  if (long) return options.find((o) => takesValue(o) && o.long === long[1]);
  // A short option with its value attached; exec has no short options today, a later one counts too.
  if (/^-[^-]./.test(word)) return options.find((o) => takesValue(o) && o.short === word.slice(0, 2));
  return undefined;
}

/**
 * The error for an exec command line whose words after the command include one of exec's own
 * options with no -- before the command; undefined when there is none. Read from `exec.options`,
 * so an option added to exec is covered. The help flag is not among them: `-h` is psql's host.
 */
export function execOptionAfterCommand(exec: Command, args: readonly string[]): string | undefined {
  let i = 0;
  // exec's own options, as commander reads them, up to the command's first word.
  while (i < args.length) {
    if (args[i] === '--') return undefined; // the user has said where the command begins
    const option = ownOption(exec.options, args[i]);
    if (!option) break;
    const separate = isFlag(option, args[i]);
    i += 1;
    // Its value in the next word (`--token X`), which may look like anything, even `--`.
    if (separate && (option.required || (option.optional && i < args.length && !args[i].startsWith('-')))) i += 1;
  }
  // An option exec does not know, or its help: commander's own error or help, nothing to add.
  if (i >= args.length || (args[i].length > 1 && args[i].startsWith('-'))) return undefined;
  for (const word of args.slice(i + 1)) {
    // A -- of the command's own: words after it were the command's under either reading.
    if (word === '--') return undefined;
    const option = ownOption(exec.options, word);
    if (!option) continue;
    // Only the option's name: the word may carry its value (--token=…), a secret for stderr logs.
    const name = option.long ?? option.short;
    return `error: exec's own option '${name}' comes after the command; put exec's options before the command, or put -- before the command if '${name}' is meant for the command`;
  }
  return undefined;
}

/** exec: refuses, before commander reads any of it, a line execOptionAfterCommand finds unclear. */
export class ExecCommand extends Command {
  override parseOptions(args: string[]): ReturnType<Command['parseOptions']> {
    const refusal = execOptionAfterCommand(this, args);
    if (refusal) this.error(refusal, { code: 'pg-broker.execOptionAfterCommand' });
    return super.parseOptions(args);
  }
}
