import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse, parseAllDocuments } from 'yaml';

// Deployment artifacts: docker-compose.yml, the Dockerfile, deploy/kubernetes and examples/.
// These files are parsed as data, so `any` stands for "whatever the YAML holds".

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const read = (file: string): string => readFileSync(path.join(ROOT, file), 'utf8');

function parseYamlFile(file: string): any[] {
  const docs = parseAllDocuments(read(file));
  for (const doc of docs) {
    assert.deepEqual(
      doc.errors.map((e) => e.message),
      [],
      `${file} is not valid YAML`,
    );
  }
  return docs.map((d) => d.toJS()).filter((d) => d !== null && d !== undefined);
}

function isRootUser(user: string): boolean {
  return /^(root|0)(:|$)/.test(user.trim());
}

test('docker-compose.yml validates with docker-compose config -q', (t) => {
  const result = spawnSync('docker-compose', ['-f', 'docker-compose.yml', 'config', '-q'], {
    cwd: ROOT,
    encoding: 'utf8',
    timeout: 120_000,
  });
  if ((result.error as NodeJS.ErrnoException | undefined)?.code === 'ENOENT') {
    t.skip(
      "docker-compose is not installed: install Debian's (apt-get install -y --no-install-recommends docker-compose) to validate docker-compose.yml",
    );
    return;
  }
  assert.ifError(result.error);
  assert.equal(result.status, 0, `docker-compose -f docker-compose.yml config -q failed:\n${result.stderr}${result.stdout}`);
});

test('docker-compose.yml stays in the v1-compatible subset', () => {
  // A static guard for when docker-compose is absent: these keys break Debian's 1.29.
  const compose = parse(read('docker-compose.yml'));
  assert.equal(compose.name, undefined, 'top-level name: is v2-only');
  assert.equal(compose.include, undefined, 'include: is v2-only');
  for (const [name, service] of Object.entries<any>(compose.services)) {
    assert.equal(service.healthcheck?.start_interval, undefined, `${name}: healthcheck.start_interval is v2-only`);
  }
});

test('compose runs PostgreSQL 16, the broker and a dev issuer; the broker has a healthcheck and is not root', () => {
  const compose = parse(read('docker-compose.yml'));
  const { postgres, broker } = compose.services;
  const issuer = compose.services['dev-issuer'];
  assert.ok(postgres && broker && issuer, 'services postgres, broker and dev-issuer');

  assert.match(postgres.image, /^postgres:16(\b|-)/, 'the official PostgreSQL 16 image');
  const initMount = (postgres.volumes as string[]).find((v) => v.includes('/docker-entrypoint-initdb.d'));
  assert.ok(initMount, 'an init SQL script is mounted into /docker-entrypoint-initdb.d');
  const initSql = read(initMount.split(':')[0]);
  const brokerRole = initSql.match(/^CREATE ROLE \w+ LOGIN CREATEROLE[^;]*;/m)?.[0];
  assert.ok(brokerRole, 'the broker role has CREATEROLE');
  assert.doesNotMatch(brokerRole, /\bSUPERUSER\b/i, 'the broker role is not a superuser');
  assert.match(initSql, /GRANT app_readers TO \w+ WITH ADMIN OPTION/, 'the group is granted WITH ADMIN OPTION (PG 16+)');
  assert.ok(postgres.healthcheck?.test, 'postgres has a healthcheck');

  assert.ok(broker.build, 'the broker is built from the Dockerfile');
  assert.ok(Array.isArray(broker.healthcheck?.test) && broker.healthcheck.test.length > 1, 'the broker has a healthcheck');
  assert.notEqual(broker.healthcheck.disable, true);
  assert.ok(broker.environment.DATABASE_URL && broker.environment.BROKER_ISSUERS && broker.environment.BROKER_AUDIENCE);

  if (broker.user !== undefined) {
    assert.ok(!isRootUser(String(broker.user)), `the broker service runs as ${broker.user}`);
  } else {
    const users = [...read('Dockerfile').matchAll(/^\s*USER\s+(\S+)/gim)].map((m) => m[1]);
    assert.ok(users.length > 0, 'the Dockerfile has a USER line');
    assert.ok(!isRootUser(users.at(-1)!), `the image's final USER is ${users.at(-1)}`);
  }

  assert.ok([issuer.command].flat().includes('dev-issuer'), 'the dev issuer runs `pg-broker dev-issuer`');
});

test('the Dockerfile is multi-stage on Node 24 slim, with a healthcheck and pg-broker serve', () => {
  const dockerfile = read('Dockerfile');
  const froms = [...dockerfile.matchAll(/^FROM\s+(\S+)/gim)];
  assert.ok(froms.length >= 2, 'multi-stage');
  assert.match(dockerfile, /node:24-(bookworm-)?slim/);
  assert.match(dockerfile, /npm ci --omit=dev/);
  assert.match(dockerfile, /^HEALTHCHECK .*[\s\S]*?\/healthz/m);
  assert.match(dockerfile, /^EXPOSE 8080/m);
  assert.match(dockerfile, /^ENTRYPOINT \["pg-broker"\]/m);
  assert.match(dockerfile, /^CMD \["serve"\]/m);
  assert.doesNotMatch(dockerfile, /^COPY\s+(\.|test|bench)\s/m, 'tests and benchmarks are not shipped');
  const ignored = read('.dockerignore').split('\n').map((l) => l.trim());
  for (const entry of ['node_modules/', 'test/', 'bench/', '.env']) assert.ok(ignored.includes(entry), `.dockerignore lists ${entry}`);
});

test('deploy/kubernetes manifests parse; the Deployment has 2 replicas, both probes and a hardened pod', () => {
  const dir = 'deploy/kubernetes';
  const files = readdirSync(path.join(ROOT, dir)).filter((f) => /\.ya?ml$/.test(f));
  assert.ok(files.length >= 6, `manifests in ${dir}: ${files.join(', ')}`);
  const docs = files.flatMap((f) => parseYamlFile(path.join(dir, f)));
  const byKind = (kind: string) => docs.filter((d) => d.kind === kind);

  const [deployment] = byKind('Deployment');
  assert.ok(deployment, 'a Deployment');
  assert.equal(deployment.spec.replicas, 2);
  const pod = deployment.spec.template.spec;
  const [container] = pod.containers;
  assert.equal(container.readinessProbe?.httpGet?.path, '/readyz');
  assert.equal(container.livenessProbe?.httpGet?.path, '/healthz');
  assert.ok(container.resources?.requests && container.resources?.limits, 'resources');
  assert.equal(pod.securityContext?.runAsNonRoot, true);
  assert.equal(container.securityContext?.readOnlyRootFilesystem, true);
  const tmp = container.volumeMounts.find((m: any) => m.mountPath === '/tmp');
  assert.ok(tmp && pod.volumes.find((v: any) => v.name === tmp.name)?.emptyDir, 'an emptyDir on /tmp');
  assert.equal(container.env.find((e: any) => e.name === 'DATABASE_URL')?.valueFrom?.secretKeyRef?.key, 'DATABASE_URL');
  assert.ok(container.envFrom.some((e: any) => e.configMapRef), 'settings from a ConfigMap');

  const [configMap] = byKind('ConfigMap');
  assert.ok(configMap && configMap.data.BROKER_ISSUERS && configMap.data.BROKER_AUDIENCE);
  assert.equal(configMap.data.DATABASE_URL, undefined, 'DATABASE_URL belongs in the Secret');
  assert.ok(byKind('Secret').length === 1 && byKind('Service').length === 1);
  assert.equal(byKind('PodDisruptionBudget')[0]?.spec.minAvailable, 1);

  const [kustomization] = byKind('Kustomization');
  for (const resource of kustomization.resources as string[]) {
    assert.ok(existsSync(path.join(ROOT, dir, resource)), `kustomization resource ${resource} exists`);
  }
  assert.ok(!kustomization.resources.includes('secret.example.yaml'), 'the example Secret is never applied');
});

test('examples: the GitHub Actions workflow and the Kubernetes init container', () => {
  const [workflow] = parseYamlFile('examples/github-actions/migrate.yml');
  assert.equal(workflow.permissions['id-token'], 'write');
  const steps = Object.values<any>(workflow.jobs).flatMap((job) => job.steps);
  // The package is not published: the job checks out the broker's repository and builds its CLI.
  const checkout = steps.find((s) => s.uses?.startsWith('actions/checkout@') && s.with?.repository);
  assert.ok(checkout, 'a checkout of the broker repository');
  const build = steps.find((s) => /npm run build/.test(s.run ?? ''));
  assert.equal(build?.['working-directory'], checkout.with.path);
  assert.ok(steps.some((s) => new RegExp(`^node ${checkout.with.path.replace('.', '\\.')}/dist/pg-broker\\.mjs exec --policy ci-migrate .*-- npm run migrate$`).test(s.run ?? '')));

  const docs = parseYamlFile('examples/kubernetes/init-container.yaml');
  const pod = docs.find((d) => d.kind === 'Deployment' || d.kind === 'Pod');
  const spec = pod.kind === 'Pod' ? pod.spec : pod.spec.template.spec;
  const init = spec.initContainers[0];
  assert.deepEqual(init.command.slice(0, 4), ['pg-broker', 'creds', '--format', 'dotenv']);
  const projected = spec.volumes.find((v: any) => v.projected)?.projected.sources[0].serviceAccountToken;
  assert.equal(projected.audience, 'pg-broker');
  assert.equal(projected.expirationSeconds, 600);
  assert.equal(spec.volumes.find((v: any) => v.name === 'credentials')?.emptyDir?.medium, 'Memory');
});
