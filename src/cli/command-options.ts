import type { Command } from 'commander';

export function withClientOptions(cmd: Command): Command {
  return cmd
    .option('--url <url>', 'broker URL (default $PG_BROKER_URL, else http://127.0.0.1:8080)')
    .option('--token <jwt>', 'bearer token (default $PG_BROKER_TOKEN)')
    .option('--token-file <path>', 'read the token from a file, e.g. a projected service-account token (default $PG_BROKER_TOKEN_FILE)')
    .option('--audience <aud>', 'the broker\'s audience: requested from the GitHub Actions OIDC runtime, and required of the Kubernetes service-account token file', 'pg-broker');
}

export function example(text: string): string {
  return `\nExamples:\n${text.split('\n').map((l) => `  ${l}`).join('\n')}\n`;
}
