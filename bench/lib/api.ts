/** One JSON request to the broker's HTTP API with a bearer token; the body parsed when there is one. */
export async function api(url: string, method: string, pathname: string, token: string, body?: unknown): Promise<{ status: number; body: any }> {
  const res = await fetch(url + pathname, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}
