// The credits API, called with the signed-in key as a bearer header (never in a URL or cookie).
const STORE = "credits.apiKey";
const BASE = new URL("../api/v1/", document.baseURI);

export class ApiError extends Error {
  constructor(status, message, type) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(STORE); },
  set(key) { sessionStorage.setItem(STORE, key); },
  clear() { sessionStorage.removeItem(STORE); },
};

function url(path, params) {
  const u = new URL(path.replace(/^\//, ""), BASE);
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") u.searchParams.set(name, String(value));
  }
  return u;
}

async function call(method, path, { params, body, key } = {}) {
  const headers = { Authorization: `Bearer ${key || session.key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url(path, params), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let type;
    try {
      const data = await response.json();
      const error = data.error || {};
      message = error.message || (typeof data.detail === "string" ? data.detail : message);
      type = error.type;
    } catch { /* not JSON: keep the status line */ }
    throw new ApiError(response.status, message, type);
  }
  return response;
}

export async function get(path, params, key) {
  return (await call("GET", path, { params, key })).json();
}

export async function post(path, body, params) {
  return (await call("POST", path, { body, params })).json();
}

// Fetch a file with the bearer header and hand it to the browser as a download.
export async function download(path, params, fallbackName) {
  const response = await call("GET", path, { params });
  const blob = await response.blob();
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename="([^"]+)"/.exec(disposition);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = match ? match[1] : fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}
