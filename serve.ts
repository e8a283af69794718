/**
 * `Deno.serve` that outlives the loss of its listener. The runtime's accept
 * loop ends for good at the first accept that fails (`EMFILE` once the
 * process holds as many descriptors as `ulimit -n` allows: a client that
 * opens that many idle connections is enough), and the server's `finished`
 * promise rejects, which, unhandled, ends the process with a stack trace.
 * The connections already open keep working; this listens again on the same
 * address, after 100 ms, doubling to 2 s, until it can.
 *
 * @module
 */

/** Options of {@linkcode serveResilient}. */
export interface ResilientServeOptions {
  hostname: string;
  /** 0 picks a free port; a later listener binds the port the first one got. */
  port: number;
  /** Answer for a handler that threw. */
  onError: (err: unknown) => Response | Promise<Response>;
  /** Told when listening stopped and when it started again. */
  log: (line: string) => void;
  /** What the log lines start with (`auth`, `chat`). */
  name: string;
}

/** A server started by {@linkcode serveResilient}. */
export interface ResilientServer {
  /** The address bound (the real port when 0 was asked). */
  addr: Deno.NetAddr;
  /**
   * Stops listening (and trying to), and resolves once every connection
   * of every listener it had has finished.
   */
  shutdown(): Promise<void>;
}

const RETRY_FIRST_MS = 100;
const RETRY_MAX_MS = 2000;
/** A listener that lasted this long failed afresh: retry from the start. */
const STABLE_MS = 10_000;

/**
 * Starts serving; throws, as `Deno.serve` does, when the first listener
 * cannot bind (address in use, not allowed...).
 */
export function serveResilient(
  options: ResilientServeOptions,
  handler: Deno.ServeHandler<Deno.NetAddr>,
): ResilientServer {
  const { hostname, onError, log, name } = options;
  const servers: Deno.HttpServer<Deno.NetAddr>[] = [];
  let stopping = false;
  let retryTimer: ReturnType<typeof setTimeout> | undefined;
  let retryMs = RETRY_FIRST_MS;
  let listenedAt = 0;

  const listen = (port: number): Deno.HttpServer<Deno.NetAddr> => {
    const server = Deno.serve(
      { hostname, port, onListen: () => {}, onError },
      handler,
    );
    servers.push(server);
    listenedAt = Date.now();
    server.finished.catch((err) => {
      if (stopping) return;
      log(
        `${name}: stopped accepting connections (${
          String(err instanceof Error ? err.message : err).replace(
            /^Error: /,
            "",
          )
        }); the open ones go on, and it listens again as soon as it can`,
      );
      retryMs = Date.now() - listenedAt >= STABLE_MS
        ? RETRY_FIRST_MS
        : Math.min(retryMs * 2, RETRY_MAX_MS);
      retry();
    });
    return server;
  };

  const addr = listen(options.port).addr;
  const retry = () => {
    if (stopping || retryTimer !== undefined) return;
    retryTimer = setTimeout(() => {
      retryTimer = undefined;
      if (stopping) return;
      try {
        listen(addr.port);
        log(`${name}: accepting connections again`);
      } catch {
        // Still out of descriptors (or the port is taken meanwhile).
        retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
        retry();
      }
    }, retryMs);
  };

  return {
    addr,
    async shutdown() {
      stopping = true;
      clearTimeout(retryTimer);
      retryTimer = undefined;
      await Promise.all(
        servers.map((server) => server.shutdown().catch(() => {})),
      );
    },
  };
}
