import { Ajv, type Options } from 'ajv';
import addFormats from 'ajv-formats';
import type { ErrorObject } from 'ajv';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest, FastifySchemaCompiler, preParsingAsyncHookHandler, RouteOptions } from 'fastify';
import { Errors } from './errors.js';

// RFC 3339 allows year 0000; PostgreSQL, having no year 0, refuses it with a data exception
// that would reach the client as a 400 naming no field.
const dateTime = addFormats.default.get('date-time') as { validate: (s: string) => boolean; compare: (a: string, b: string) => number | undefined };
const storableDateTime = { type: 'string' as const, validate: (s: string) => !s.startsWith('0000') && dateTime.validate(s), compare: dateTime.compare };

function makeAjv(options: Options): Ajv {
  // verbose: errors carry their schema, so schemaErrors can quote a rule's description.
  const ajv = new Ajv({ removeAdditional: false, useDefaults: true, allErrors: false, strict: false, verbose: true, ...options });
  addFormats.default(ajv);
  ajv.addFormat('date-time', storableDateTime);
  return ajv;
}

// Query strings and path parameters are text on the wire and need coercion ("?limit=10");
// JSON bodies are typed already, and a string where a number belongs is the client's error.
const coercing = makeAjv({ coerceTypes: 'array' });
const strict = makeAjv({ coerceTypes: false });

export const validatorCompiler: FastifySchemaCompiler<unknown> = ({ schema, httpPart }) =>
  (httpPart === 'body' ? strict : coercing).compile(schema as object) as ReturnType<FastifySchemaCompiler<unknown>>;

/**
 * Fastify's own wording (`body/ttl must be >= 1`), except that a value outside an enum also names
 * the values allowed: "must be equal to one of the allowed values" alone leaves the caller guessing.
 * So too a failed pattern or format whose schema has a description, written to follow "must be":
 * a regular expression or a format's name does not tell a caller what a value may look like.
 */
export function schemaErrors(errors: Array<Partial<ErrorObject>>, dataVar: string): Error {
  const { kept, described } = unionErrors(errors);
  const text = kept.map((e) => {
    const field = `${dataVar}${e.instancePath ?? ''}`;
    // `?limit=5&limit=6` arrives as an array: "must be integer" would not say what was wrong.
    if (dataVar === 'querystring' && e.keyword === 'type' && Array.isArray(e.data)) return `${field} is given more than once`;
    const rule = e.keyword === 'pattern' || e.keyword === 'format' || (e.keyword === 'anyOf' && described.has(e)) ? (e.parentSchema as { description?: unknown } | undefined)?.description : undefined;
    if (typeof rule === 'string') return `${field} must be ${rule}`;
    const allowed = e.keyword === 'enum' ? (e.params as { allowedValues?: unknown[] } | undefined)?.allowedValues : undefined;
    if (allowed) return `${field} ${e.message} (${allowed.join(', ')})`;
    // Which one: "must NOT have additional properties" alone leaves the caller to find it.
    const extra = e.keyword === 'additionalProperties' ? (e.params as { additionalProperty?: unknown } | undefined)?.additionalProperty : undefined;
    return typeof extra === 'string' ? `${field} must NOT have additional properties: ${JSON.stringify(extra).slice(0, 120)} is not one of its fields` : `${field} ${e.message}`;
  }).join(', ');
  return new Error(text);
}

/**
 * A union's failure lists every branch's ("must be string, must be array, must match a schema in
 * anyOf"). When the value has one branch's type, only that branch's own failure is kept (a string
 * too long, an item of the wrong type). When it fits no branch, the union's description, if it has
 * one, replaces the list of types.
 */
function unionErrors(errors: Array<Partial<ErrorObject>>): { kept: Array<Partial<ErrorObject>>; described: Set<Partial<ErrorObject>> } {
  const dropped = new Set<Partial<ErrorObject>>();
  const described = new Set<Partial<ErrorObject>>();
  for (const union of errors.filter((e) => e.keyword === 'anyOf')) {
    const path = union.instancePath ?? '';
    const branches = errors.filter((e) => e !== union && e.keyword !== 'anyOf' && ((e.instancePath ?? '') === path || (e.instancePath ?? '').startsWith(`${path}/`)));
    const wrongType = branches.filter((e) => e.keyword === 'type' && (e.instancePath ?? '') === path);
    if (wrongType.length < branches.length) {
      for (const e of [...wrongType, union]) dropped.add(e);
    } else if (typeof (union.parentSchema as { description?: unknown } | undefined)?.description === 'string') {
      for (const e of wrongType) dropped.add(e);
      described.add(union);
    }
  }
  return { kept: errors.filter((e) => !dropped.has(e)), described };
}

/** `key` as a path segment that carries no control character into a message. */
const segment = (key: string) => JSON.stringify(key).slice(1, -1).replace(/~/g, '~0').replace(/\//g, '~1');

/** Where in `value` a NUL character sits first (a `path/to/field`), or null. */
function nulAt(value: unknown, path: string, depth = 0): { path: string; inName: boolean } | null {
  if (typeof value === 'string') return value.includes('\u0000') ? { path, inName: false } : null;
  if (depth > 32 || value === null || typeof value !== 'object') return null;
  for (const [key, item] of Object.entries(value)) {
    if (key.includes('\u0000')) return { path, inName: true };
    const found = nulAt(item, `${path}/${segment(key)}`, depth + 1);
    if (found) return found;
  }
  return null;
}

/**
 * preHandler for every route: a NUL character in a query parameter or anywhere in the body is
 * refused naming where it is. PostgreSQL cannot store one in text and refuses the statement, whose
 * error names no field. (After validation, so a field whose schema refuses it says why first.)
 */
export function refuseNul(except: Set<string>): (request: FastifyRequest) => Promise<void> {
  return async (request) => {
    // Paths that ignore their query (probes, the API document) and store nothing; and no route
    // at all (url undefined), which is a 404 whatever it was sent.
    const route = request.routeOptions.url;
    if (route === undefined || except.has(route)) return;
    const at = nulAt(request.query, 'querystring') ?? nulAt(request.body, 'body');
    if (!at) return;
    throw new Errors.BadRequest(at.inName
      ? `${at.path} has a field name holding a NUL character, which PostgreSQL cannot store`
      : `${at.path} holds a NUL character, which PostgreSQL cannot store`);
  };
}

const NO_PARAMETERS = { type: 'object', properties: {}, additionalProperties: false };

const carriesNothing = (body: unknown) =>
  body === undefined || body === null || body === '' || (typeof body === 'object' && !Array.isArray(body) && Object.keys(body).length === 0);

/**
 * For a route (onRoute) that declares no query string or no body: a query parameter or a body it
 * would ignore is refused with 400, not dropped. A caller who sends `?ttl=5` or a revocation
 * `{"reason": …}` means it, and would otherwise get something other than what was asked for
 * without being told. An empty body (nothing, `{}`, `null`) is no input. `except` keeps paths
 * that probes and scrapers call free of the rule.
 */
export function refuseUndeclaredInputs(route: RouteOptions, except: Set<string>): void {
  if (!route.schema || except.has(route.url)) return;
  route.schema.querystring ??= NO_PARAMETERS;
  const methods = [route.method].flat();
  if (route.schema.body || methods.every((m) => m === 'GET' || m === 'HEAD')) return;
  const refuseBody = async (request: FastifyRequest) => {
    if (!carriesNothing(request.body)) throw new Errors.BadRequest(`${request.method} ${route.url.replace(/:(\w+)/g, '{$1}')} takes no request body`);
  };
  route.preValidation = [...[route.preValidation ?? []].flat(), refuseBody] as RouteOptions['preValidation'];
}

/**
 * preValidation for POST routes whose body fields are all optional: a request that sends no
 * body at all (`curl -X POST`, fetch without a body) asks for the defaults. A body that is sent,
 * even `null` or an empty one labelled JSON, must still be a valid object.
 */
export async function noBodyMeansNoOptions(request: FastifyRequest): Promise<void> {
  if (request.body === undefined) request.body = {};
}

/**
 * Runs a token check as a preParsing hook, before the body is read: a request without a valid
 * token gets its 401 (or a non-admin its 403) whatever it sends, and no unauthenticated body is
 * parsed or buffered.
 */
export function beforeBody(check: (request: FastifyRequest, reply: FastifyReply) => Promise<void>): preParsingAsyncHookHandler {
  return async (request, reply, payload) => {
    await check(request, reply);
    return payload;
  };
}

function isJson(text: string): boolean {
  try {
    // secure-json-parse skips a leading byte order mark; JSON.parse does not.
    JSON.parse(text.charCodeAt(0) === 0xfeff ? text.slice(1) : text);
    return true;
  } catch {
    return false;
  }
}

/**
 * Fastify's JSON parser (secure-json-parse) refuses a body holding a `__proto__` key, or a
 * `constructor` holding a `prototype`, so no handler can be led into altering a prototype; but it
 * calls them "not valid JSON", which sends the caller looking for a syntax error that is not
 * there. Still refused, with the reason. Only a body the parser refused is parsed a second time.
 */
export function installJsonBodyParser(app: FastifyInstance): void {
  const secureParse = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (request, body, done) => {
    const text = body.toString();
    secureParse(request, text, (err, value) => {
      if ((err as FastifyError | null)?.code === 'FST_ERR_CTP_INVALID_JSON_BODY' && isJson(text)) {
        done(new Errors.BadRequest('The body contains a forbidden property name (__proto__, or constructor.prototype); '
          + 'such keys are refused so that no object prototype can be altered'), undefined);
        return;
      }
      done(err, value);
    });
  });
}
