import pino, { type Logger } from 'pino';

export type LogDestination = pino.DestinationStream;

// Fields that can carry a secret are censored at the top level of a log object and one level
// down (pino's redaction paths take no deeper wildcard); the authorization header at its paths.
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
  // A statement failing inside a creator's function (creator-functions.ts) comes back with its
  // text, a CREATE ROLE's verifier included, in the error's context and internal query.
  'where',
  '*.where',
  'internalQuery',
  '*.internalQuery',
];

export function createLogger(level: string, destination?: LogDestination): Logger {
  const options: pino.LoggerOptions = { level, redact: { paths: REDACT_PATHS, censor: '[REDACTED]' } };
  if (destination) return pino(options, destination);
  // Pretty output only for a person at a terminal; machines get JSON lines.
  if (process.stdout.isTTY) {
    return pino({ ...options, transport: { target: 'pino-pretty', options: { translateTime: 'SYS:HH:MM:ss', ignore: 'pid,hostname' } } });
  }
  return pino(options);
}
