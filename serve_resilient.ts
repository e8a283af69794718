/**
 * `Deno.serve` that outlives the loss of its listener. The runtime's accept
 * loop ends for good at the first accept that fails (`EMFILE` once the
 * process holds as many descriptors as `ulimit -n` allows: a client that
 * opens that many idle connections is enough), and the server's `finished`
 * promise rejects, which, unhandled, ends the process with a stack trace.
 * The connections already open keep working (shutting the dead server down
 * would close its WebSockets, so it is kept until the end); this listens
 * again on the same address until it can.
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
  /**
   * Told (`listener stopped ...`, `listener cannot listen again ...`,
   * `listener accepting connections again`) when listening stops and starts
   * again.
   */
  log: (event: string) => void;
  /** First wait before listening again, in ms. Default 100. */
  retryFirstMs?: number;
  /**
   * Longest wait, in ms: the wait doubles while listening again fails, or a
   * new listener stops within `stableMs`. Default 30,000.
   */
  retryMaxMs?: number;
  /** A listener that lasted this long stopped afresh: the wait starts over. Default 10,000. */
  stableMs?: number;
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

/**
 * Starts serving; throws, as `Deno.serve` does, when the first listener
 * cannot bind (address in use, not allowed...).
 */
export function serveResilient(
  options: ResilientServeOptions,
  handler: Deno.ServeHandler<Deno.NetAddr>,
): ResilientServer {
  const {
    hostname,
    onError,
    log,
    retryFirstMs = 100,
    retryMaxMs = 30_000,
    stableMs = 10_000,
  } = options;
  const servers: Deno.HttpServer<Deno.NetAddr>[] = [];
  let stopping = false;
  let retryTimer: ReturnType<typeof setTimeout> | undefined;
  let retryMs = retryFirstMs;
  let listenedAt = 0;
  /** The last reason listening again failed (logged once per reason). */
  let bindError = "";

  const listen = (port: number): Deno.HttpServer<Deno.NetAddr> => {
    const server = Deno.serve(
      { hostname, port, onListen: () => {}, onError },
      handler,
    );
    servers.push(server);
    listenedAt = Date.now();
    server.finished.catch((err) => {
      if (stopping) return;
      retryMs = Date.now() - listenedAt >= stableMs
        ? retryFirstMs
        : Math.min(retryMs * 2, retryMaxMs);
      log(
        `listener stopped reason=${
          JSON.stringify(reason(err))
        } (the open connections go on; listening again in ${retryMs} ms)`,
      );
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
        bindError = "";
        log("listener accepting connections again");
      } catch (err) {
        // Still out of descriptors, or the port was taken meanwhile.
        retryMs = Math.min(retryMs * 2, retryMaxMs);
        if (reason(err) !== bindError) {
          bindError = reason(err);
          log(
            `listener cannot listen again reason=${
              JSON.stringify(bindError)
            } (trying again, at most every ${retryMaxMs} ms)`,
          );
        }
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

function reason(err: unknown): string {
  return String(err instanceof Error ? err.message : err).replace(
    /^Error: /,
    "",
  );
}
