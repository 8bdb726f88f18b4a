import pino, { type Logger } from 'pino';

export type LogDestination = pino.DestinationStream;

// Anything that can carry a secret is censored wherever it appears in a log object.
export const REDACT_PATHS = [
  'req.headers.authorization',
  'headers.authorization',
  'authorization',
  'token',
  '*.token',
  'password',
  '*.password',
  'verifier',
  '*.verifier',
  'uri',
  '*.uri',
  'databaseUrl',
  '*.databaseUrl',
  'DATABASE_URL',
  '*.DATABASE_URL',
  'connectionString',
  '*.connectionString',
];

/** Strips the password from a connection URL so it can be logged. */
export function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = '[REDACTED]';
    return parsed.toString();
  } catch {
    return '[unparseable URL]';
  }
}

export function createLogger(level: string, destination?: LogDestination): Logger {
  const options: pino.LoggerOptions = { level, redact: { paths: REDACT_PATHS, censor: '[REDACTED]' } };
  if (destination) return pino(options, destination);
  // Pretty output only for a person at a terminal; machines get JSON lines.
  if (process.stdout.isTTY) {
    return pino({ ...options, transport: { target: 'pino-pretty', options: { translateTime: 'SYS:HH:MM:ss', ignore: 'pid,hostname' } } });
  }
  return pino(options);
}
