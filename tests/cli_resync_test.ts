/**
 * The client taking up a session where it left off (`resume`, as after a
 * reconnect or an expiry) against real servers: the session runs in this
 * process, its socket is the built-in `WebSocket`, watched on its way.
 */
import assert from "node:assert/strict";
import { ChatSession, type SessionState } from "../cli/chat_session.ts";
import { LineReader } from "../cli/line_reader.ts";
import { keyboard, screen } from "./_cli_helpers.ts";
import {
  connectAs,
  login,
  type Stack,
  startStack,
  waitFor,
} from "./_harness.ts";

function storedLine(room: string, id: number, text: string, ts: string) {
  return JSON.stringify({
    type: "message",
    id: String(id),
    room,
    from: "bob",
    text,
    ts,
  }) + "\n";
}

/** Where alice's earlier session left off: `rooms`, each shown up to id 1. */
function leftOff(rooms: string[], ts: string): SessionState {
  return {
    rooms,
    serverRooms: rooms,
    outbox: [],
    oldestId: rooms.map((r) => [r, "1"]),
    lastId: rooms.map((r) => [r, 1n]),
    pending: [],
    gapTold: [],
    seenTs: rooms.map((r) => [r, [["1", ts]]]),
    ownTs: [],
  };
}

/**
 * Runs alice's session resumed from `resume`; `watch` sees every frame it
 * sends (`out`) and every frame it receives (`in`).
 */
async function resumed(
  stack: Stack,
  resume: SessionState,
  watch: (way: "out" | "in", frame: { type?: string }) => void = () => {},
) {
  const token = await login(stack.auth.url, "alice");
  const { writer, out } = screen();
  const keys = keyboard();
  const lines = new LineReader({ input: keys.input, output: writer });
  const session = new ChatSession({
    chatUrl: stack.chat.url,
    token,
    username: "alice",
    lines,
    color: false,
    checkSession: () => Promise.resolve("valid"),
    connect: (url, bearer) => {
      const socket = new WebSocket(url, {
        headers: { authorization: `Bearer ${bearer}` },
      });
      const send = socket.send.bind(socket);
      socket.send = (data: string) => {
        watch("out", JSON.parse(data));
        send(data);
      };
      socket.addEventListener("message", (event) => {
        for (const line of String(event.data).split("\n")) {
          watch("in", JSON.parse(line));
        }
      });
      return socket;
    },
    resume,
  });
  const ended = session.run();
  return {
    out,
    async quit() {
      keys.type("/quit");
      await ended;
      lines.close();
    },
  };
}

Deno.test("after a crash, the gap of a resync that takes several pages is told once", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "cli_resync_" });
  const ts = new Date(Date.now() - 60_000).toISOString();
  await Deno.mkdir(`${dataDir}/history`);
  // 50 missed messages of 8 KB: a page cut by size, then a page that
  // reaches the end and is too large to tell it was not cut.
  let file = storedLine("lobby", 1, "seen-before", ts);
  for (let i = 1; i <= 50; i++) {
    file += storedLine(
      "lobby",
      i + 1,
      `missed-${i} ${"\u00e9".repeat(3990)}`,
      ts,
    );
  }
  await Deno.writeTextFile(`${dataDir}/history/lobby.jsonl`, file);
  // The run that wrote them crashed: ids past 51 may have been handed out
  // and lost, which the server reports on every page that reaches them.
  await Deno.writeTextFile(`${dataDir}/history/.running`, "");
  const stack = await startStack({ dataDir });
  try {
    let pages = 0;
    const { promise: lastPage, resolve } = Promise.withResolvers<void>();
    const session = await resumed(stack, leftOff(["lobby"], ts), (way, f) => {
      if (way === "in" && f.type === "history" && ++pages === 3) resolve();
    });
    await session.out.next(/missed-50 /);
    // The third page, empty, says `gap` as the second did.
    await lastPage;
    await session.quit();
    assert.equal(
      session.out.count((l) => l.includes("may be missing")),
      1,
      session.out.text,
    );
    const shown = session.out.lines.map((l) => l.match(/missed-(\d+) /)?.[1])
      .filter((n) => n !== undefined).map(Number);
    assert.deepEqual(shown, Array.from({ length: 50 }, (_, i) => i + 1));
  } finally {
    await stack.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a resync asks for at most two pages of history at once (joins included), one page a room when it holds all that was missed, and shows every room's missed messages", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "cli_resync_" });
  const ts = new Date(Date.now() - 60_000).toISOString();
  const rooms = ["lobby", "r1", "r2", "r3", "r4", "r5", "r6"];
  await Deno.mkdir(`${dataDir}/history`);
  for (const room of rooms) {
    await Deno.writeTextFile(
      `${dataDir}/history/${room}.jsonl`,
      storedLine(room, 1, `seen ${room}`, ts) +
        storedLine(room, 2, `missed ${room} a`, ts) +
        storedLine(room, 3, `missed ${room} b`, ts),
    );
  }
  const stack = await startStack({ dataDir });
  try {
    let inFlight = 0;
    let most = 0;
    let historyAsks = 0;
    const session = await resumed(stack, leftOff(rooms, ts), (way, f) => {
      if (way === "out" && (f.type === "join" || f.type === "history")) {
        most = Math.max(most, ++inFlight);
      }
      if (way === "out" && f.type === "history") historyAsks++;
      if (way === "in" && (f.type === "joined" || f.type === "history")) {
        inFlight--;
      }
    });
    for (const room of rooms) await session.out.next(`missed ${room} b`);
    await session.quit();
    assert.ok(most >= 1 && most <= 2, `${most} in flight`);
    // A short page far under the size limit is the end: no empty page is
    // asked for after it.
    assert.equal(historyAsks, rooms.length);
    for (const room of rooms) {
      for (const x of ["a", "b"]) {
        assert.equal(
          session.out.count((l) => l.endsWith(`missed ${room} ${x}`)),
          1,
          session.out.text,
        );
      }
    }
  } finally {
    await stack.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a message on disk longer than the protocol allows does not end a resync early", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "cli_resync_" });
  const ts = new Date(Date.now() - 60_000).toISOString();
  await Deno.mkdir(`${dataDir}/history`);
  // Written by other means: ten messages of 5 KB, one of 250 KB, one more.
  let file = storedLine("lobby", 1, "seen-before", ts);
  for (let i = 1; i <= 10; i++) {
    file += storedLine("lobby", i + 1, `missed-${i} ${"y".repeat(5000)}`, ts);
  }
  file += storedLine("lobby", 12, `missed-11 ${"z".repeat(250_000)}`, ts);
  file += storedLine("lobby", 13, "missed-12 after", ts);
  await Deno.writeTextFile(`${dataDir}/history/lobby.jsonl`, file);
  const stack = await startStack({ dataDir });
  try {
    const session = await resumed(stack, leftOff(["lobby"], ts));
    await session.out.next(/missed-12 after/);
    await session.quit();
    const shown = session.out.lines.map((l) => l.match(/missed-(\d+) /)?.[1])
      .filter((n) => n !== undefined).map(Number);
    assert.deepEqual(shown, Array.from({ length: 12 }, (_, i) => i + 1));
  } finally {
    await stack.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("an own message stored before the drop, echoed again after more than a screenful of others, is shown once and is not taken for a history that started over", async () => {
  const stack = await startStack();
  try {
    // alice's message reached the server, and bob; her echo never came back.
    const bob = await connectAs(stack, "bob");
    bob.send({ type: "message", text: "seen-before" });
    const seen = await bob.next((f) => f.text === "seen-before");
    const alice = await connectAs(stack, "alice");
    const clientId = crypto.randomUUID();
    alice.send({ type: "message", text: "my-message", client_id: clientId });
    await alice.next((f) => f.client_id === clientId);
    await alice.close();
    // Then more than the client remembers of the room's ids (256).
    for (let i = 1; i <= 300; i++) {
      bob.send({ type: "message", text: `b-${i}` });
    }
    await bob.next((f) => f.text === "b-300");
    await bob.close();

    let replays = 0;
    const session = await resumed(stack, {
      ...leftOff(["lobby"], String(seen.ts)),
      lastId: [["lobby", BigInt(String(seen.id))]],
      oldestId: [["lobby", String(seen.id)]],
      seenTs: [["lobby", [[String(seen.id), String(seen.ts)]]]],
      // As typed: the frame waits in the outbox, the text shows as pending.
      outbox: [{
        type: "message",
        room: "lobby",
        text: "my-message",
        client_id: clientId,
      }],
      pending: [[clientId, { room: "lobby", text: "my-message" }]],
    }, (way, f) => {
      if (way === "in" && "client_id" in f && f.client_id === clientId) {
        replays++;
      }
    });
    await session.out.next(/<bob> b-300$/);
    await waitFor(() => replays > 0, 5000, "the original's echo");
    await session.quit();
    assert.equal(
      session.out.count((l) => /\] <alice> my-message$/.test(l)),
      1,
      session.out.text,
    );
    assert.equal(
      session.out.count((l) => l.includes("started over")),
      0,
      session.out.text,
    );
  } finally {
    await stack.close();
  }
});
