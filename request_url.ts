/**
 * The URL of a request, as both servers route it. The runtime builds
 * `req.url` from the `Host` header and the request line, so a `Host` holding
 * `/`, `?` or `#` (`x/health?`) would rewrite the path being routed; only
 * `host[:port]` is accepted here.
 *
 * @module
 */

/** A name (letters, digits, `.`, `-`, `_`) or a bracketed IPv6 address, and an optional port. */
const HOST_RE = /^(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$/;

/**
 * The request's URL, or `null` when its `Host` header names no host (`a b`,
 * `[zz]`, `x/health?`): such a request has nothing to route.
 */
export function requestUrl(req: Request): URL | null {
  const host = req.headers.get("host");
  if (host !== null && !HOST_RE.test(host)) return null;
  return URL.parse(req.url);
}
