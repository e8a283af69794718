// deno-lint-ignore-file no-console
/**
 * The benchmark's floor: the smallest broadcast server on this runtime.
 * `Deno.serve` + `Deno.upgradeWebSocket`; every frame received is sent, as
 * is, to every open client (the sender included). Nothing else: no auth, no
 * rooms, no history, no limits, no coalescing.
 *
 * Any request that is not a WebSocket upgrade has its body read and gets a
 * fixed small JSON answer, so the same process is also the floor for the
 * `/validate_token` requests/s figure (bare `Deno.serve` round trip).
 *
 * With `--message-frames` it is the floor of the contract's frames instead:
 * each frame received is parsed and what every client gets is a chat
 * `message` frame carrying its text (`id`, `room`, `from`, `ts` added),
 * serialised once. Any server that sends what CONTRACT section 4 asks for,
 * one frame per message per recipient, does at least this much.
 *
 * Usage: `deno run --allow-net=127.0.0.1 bench/baseline_server.ts [--port 0] [--exit-on-eof] [--message-frames]`
 * Prints `listening on http://HOST:PORT` when ready; SIGTERM/SIGINT exit 0, and
 * so does the end of stdin with `--exit-on-eof` (the bench uses it, so that a
 * killed orchestrator leaves no server behind).
 *
 * @module
 */

const HOST = "127.0.0.1";

function main(): void {
  const portIndex = Deno.args.indexOf("--port");
  const port = portIndex === -1 ? 0 : Number(Deno.args[portIndex + 1]);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error("Cannot start the baseline server: --port needs 0 to 65535");
    Deno.exit(2);
  }
  const clients = new Set<WebSocket>();
  const messageFrames = Deno.args.includes("--message-frames");
  let lastId = 0;
  const body = JSON.stringify({ valid: true, username: "baseline" });
  const controller = new AbortController();
  // Signal handlers go in before the ready line is printed.
  const stop = () => {
    controller.abort();
    setTimeout(() => Deno.exit(0), 500);
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);

  if (Deno.args.includes("--exit-on-eof")) {
    Deno.stdin.readable.pipeTo(new WritableStream()).finally(stop);
  }

  Deno.serve({
    signal: controller.signal,
    hostname: HOST,
    port,
    onListen: (addr) => {
      console.log(`listening on http://${addr.hostname}:${addr.port}`);
    },
  }, async (req) => {
    if (req.headers.get("upgrade")?.toLowerCase() !== "websocket") {
      await req.arrayBuffer();
      return new Response(body, {
        headers: { "content-type": "application/json" },
      });
    }
    const { socket, response } = Deno.upgradeWebSocket(req);
    socket.onopen = () => clients.add(socket);
    socket.onmessage = (event) => {
      const data = messageFrames ? messageFrame(event.data) : event.data;
      for (const client of clients) {
        if (client.readyState === WebSocket.OPEN) client.send(data);
      }
    };
    socket.onclose = () => clients.delete(socket);
    socket.onerror = () => clients.delete(socket);
    return response;
  });

  /** The chat `message` frame for a client's `{"type":"message","text"}`. */
  function messageFrame(data: unknown): string {
    let text = String(data);
    try {
      const frame: unknown = JSON.parse(text);
      if (
        typeof frame === "object" && frame !== null && "text" in frame &&
        typeof frame.text === "string"
      ) text = frame.text;
    } catch {
      // Not JSON: the frame is the text, as the contract says.
    }
    return JSON.stringify({
      type: "message",
      id: String(++lastId),
      room: "lobby",
      from: "user000001",
      text,
      ts: new Date().toISOString(),
    });
  }
}

if (import.meta.main) main();
