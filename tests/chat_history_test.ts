import assert from "node:assert/strict";
import { HistoryStore, HistoryWriteError } from "../chat/history.ts";
import type { RoomMessage } from "../chat/protocol.ts";

/** A line of `lobby.jsonl` as the store writes it. */
function good(id: number): string {
  return JSON.stringify({
    type: "message",
    id: String(id),
    room: "lobby",
    from: "a",
    text: `t${id}`,
    ts: "2026-01-01T00:00:00.000Z",
  });
}

/** The messages of a room's file, as stored. */
function fileLines(dir: string, room: string): Record<string, unknown>[] {
  return Deno.readTextFileSync(`${dir}/${room}.jsonl`).trimEnd().split("\n")
    .map((l) => JSON.parse(l));
}

/**
 * A store keeping 2 messages a room, whose lobby file holds nine written
 * out: its next flush compacts the file.
 */
async function nineLinesForTwo(dir: string): Promise<HistoryStore> {
  const store = await HistoryStore.open(dir, {
    keep: 2,
    flushIntervalMs: 60_000,
  });
  for (let i = 1; i <= 9; i++) {
    store.append("lobby", "alice", `m${i}`);
  }
  return store;
}

Deno.test("history keeps the tail of each room across reopen and continues ids", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const store = await HistoryStore.open(dir, { keep: 5 });
    for (let i = 1; i <= 12; i++) store.append("dev", "alice", `m${i}`);
    assert.deepEqual(store.recent("dev", 50).messages.map((m) => m.text), [
      "m8",
      "m9",
      "m10",
      "m11",
      "m12",
    ]);
    await store.close();
    const again = await HistoryStore.open(dir, { keep: 5 });
    assert.deepEqual(again.recent("dev", 3).messages.map((m) => m.id), [
      "10",
      "11",
      "12",
    ]);
    assert.equal(again.append("dev", "bob", "next").message.id, "13");
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a torn last line from a crash is skipped and the file is repaired", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(
      `${dir}/lobby.jsonl`,
      `${good(1)}\n${good(2)}\n{"type":"mess`,
    );
    const store = await HistoryStore.open(dir, { keep: 10 });
    assert.deepEqual(store.recent("lobby", 10).messages.map((m) => m.id), [
      "1",
      "2",
    ]);
    store.append("lobby", "a", "t3");
    await store.close();
    const lines = (await Deno.readTextFile(`${dir}/lobby.jsonl`)).split("\n");
    assert.equal(lines.pop(), "");
    assert.deepEqual(lines.map((l) => JSON.parse(l).id), ["1", "2", "3"]);
    const entries = [];
    for await (const e of Deno.readDir(dir)) entries.push(e.name);
    assert.deepEqual(entries.sort(), [".lock", "lobby.jsonl"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a whole last line without its newline is kept (zeros after it or not), a torn one with a crash's zeros after it is dropped", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/lobby.jsonl`, `${good(1)}\n${good(2)}`);
    // The newline itself lost, with zeros after the line.
    await Deno.writeTextFile(
      `${dir}/ops.jsonl`,
      `${good(1)}\n${good(2)}\0\0\0`,
    );
    await Deno.writeTextFile(
      `${dir}/dev.jsonl`,
      `${good(1)}\n{"type":"message","id":"2","ro\0\0\0\0`,
    );
    const store = await HistoryStore.open(dir, { keep: 10 });
    assert.deepEqual(store.recent("lobby", 10).messages.map((m) => m.id), [
      "1",
      "2",
    ]);
    assert.deepEqual(store.recent("dev", 10).messages.map((m) => m.id), ["1"]);
    assert.deepEqual(store.recent("ops", 10).messages.map((m) => m.id), [
      "1",
      "2",
    ]);
    store.append("lobby", "a", "t3");
    store.append("dev", "a", "t2");
    await store.close();
    for (
      const [room, ids] of [
        ["lobby", ["1", "2", "3"]],
        ["dev", ["1", "2"]],
        ["ops", ["1", "2"]],
      ] as const
    ) {
      const lines = (await Deno.readTextFile(`${dir}/${room}.jsonl`)).split(
        "\n",
      );
      assert.equal(lines.pop(), "");
      assert.deepEqual(lines.map((l) => JSON.parse(l).id), ids);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a large history file is read from its tail and compacted", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const lines: string[] = [];
    for (let i = 1; i <= 20_000; i++) {
      lines.push(
        JSON.stringify({
          type: "message",
          id: String(i),
          room: "big",
          from: "a",
          text: `text number ${i}`,
          ts: "2026-01-01T00:00:00.000Z",
        }),
      );
    }
    await Deno.writeTextFile(`${dir}/big.jsonl`, lines.join("\n") + "\n");
    const store = await HistoryStore.open(dir, { keep: 100 });
    assert.deepEqual(store.recent("big", 2).messages.map((m) => m.id), [
      "19999",
      "20000",
    ]);
    const page = store.after("big", "10", 5);
    assert.equal(page.gap, true);
    assert.equal(page.messages[0]!.id, "19901");
    await store.flush();
    const kept = (await Deno.readTextFile(`${dir}/big.jsonl`)).trim().split(
      "\n",
    );
    assert.equal(kept.length, 100);
    await store.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a damaged complete line stops the opening with a message naming the file, which is left as it was", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (
      const damaged of [
        `${good(1)}\nGARBAGE\n${good(2)}\n`,
        `${good(2)}\n${good(1)}\n`,
        `totally not json\n`,
        // No newline at the end, and not the start of a message: not a
        // crash's torn append, so not dropped as one.
        `this is garbage not a history file at all`,
        `${good(1)}\n${good(2)}\nGARBAGE`,
        `${good(1)}\n{"type":"message","id":"2"}`,
      ]
    ) {
      await Deno.writeTextFile(`${dir}/lobby.jsonl`, damaged);
      await assert.rejects(
        HistoryStore.open(dir, { keep: 10 }),
        (err: Error) => err.message.includes(`${dir}/lobby.jsonl`),
      );
      assert.equal(await Deno.readTextFile(`${dir}/lobby.jsonl`), damaged);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the sender's client_id is kept on disk and across a compaction, but in no message handed out", async () => {
  const dir = await Deno.makeTempDir();
  try {
    let now = Date.parse("2026-01-01T00:00:00.000Z");
    const store = await HistoryStore.open(dir, { keep: 2, now: () => now });
    const { line, own } = store.append("dev", "alice", "hi", "c-1");
    assert.equal(line.includes("c-1"), false);
    assert.equal(JSON.parse(own).client_id, "c-1");
    now += 1000;
    store.append("dev", "bob", "yo");
    await store.close();
    const onDisk = (await Deno.readTextFile(`${dir}/dev.jsonl`)).trim()
      .split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(onDisk.map((m) => m.client_id), ["c-1", undefined]);

    const again = await HistoryStore.open(dir, { keep: 2, now: () => now });
    assert.ok(!again.recentJson("dev").includes("c-1"));
    assert.ok(
      again.recent("dev", 5).messages.every((m) => !("client_id" in m)),
    );
    assert.deepEqual(
      again.sentSince(now - 10_000).map((s) => [s.from, s.clientId]),
      [["alice", "c-1"]],
    );
    assert.equal(JSON.parse(again.sentSince(0)[0]!.own).client_id, "c-1");
    assert.deepEqual(again.sentSince(now), []);
    // Past the kept count, the messages of the last ten minutes stay, in
    // memory and in the file (rewritten past four times the count), so
    // that exactly-once holds across a restart however busy the room.
    for (let i = 0; i < 10; i++) {
      again.append("dev", "carol", `m${i}`, `k-${i}`);
    }
    await again.close();
    const third = await HistoryStore.open(dir, { keep: 2, now: () => now });
    assert.deepEqual(third.sentSince(0).map((s) => s.clientId), [
      "c-1",
      ...Array.from({ length: 10 }, (_, i) => `k-${i}`),
    ]);
    await third.close();
    // Ten minutes later, the kept count is what stays.
    now += 10 * 60_000 + 1;
    const fourth = await HistoryStore.open(dir, { keep: 2, now: () => now });
    assert.deepEqual(fourth.sentSince(0).map((s) => s.clientId), [
      "k-8",
      "k-9",
    ]);
    assert.deepEqual(fourth.recent("dev", 50).messages.map((m) => m.text), [
      "m8",
      "m9",
    ]);
    await fourth.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("before the kept tail, only the window's messages sent with a client_id are read back, up to an unreadable time; the rest leaves the file", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const now = Date.parse("2026-01-01T12:00:00.000Z");
    const at = (minutesAgo: number) =>
      new Date(now - minutesAgo * 60_000).toISOString();
    const lines: [string | undefined, string][] = [
      ["a", at(20)], // before the window
      ["b", "yesterday"], // a time that cannot be read: the window ends here
      ["c", at(5)],
      [undefined, at(4)], // no client_id: not needed past the kept tail
      ["e", at(3)],
      ["f", at(2)],
      [undefined, at(1)],
      [undefined, at(0)],
    ];
    await Deno.writeTextFile(
      `${dir}/dev.jsonl`,
      lines.map(([clientId, ts], i) =>
        JSON.stringify({
          type: "message",
          id: String(i + 1),
          room: "dev",
          from: "alice",
          text: `m${i + 1}`,
          ts,
          ...(clientId !== undefined && { client_id: clientId }),
        }) + "\n"
      ).join(""),
    );
    const store = await HistoryStore.open(dir, { keep: 2, now: () => now });
    assert.deepEqual(store.recent("dev", 10).messages.map((m) => m.id), [
      "7",
      "8",
    ]);
    assert.deepEqual(
      store.sentSince(now - 10 * 60_000).map((s) => s.clientId),
      ["c", "e", "f"],
    );
    await store.close();
    const ids = (await Deno.readTextFile(`${dir}/dev.jsonl`)).trim().split("\n")
      .map((l) => JSON.parse(l).id);
    assert.deepEqual(ids, ["3", "5", "6", "7", "8"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("after a run that did not close, ids jump past anything it may have handed out, and asking across the hole says gap", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const store = await HistoryStore.open(dir, { keep: 10 });
    for (let i = 1; i <= 3; i++) store.append("dev", "alice", `m${i}`);
    await store.close();
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), [
      ".lock",
      "dev.jsonl",
    ]);
    // A run that crashed: its marker is still there; whatever it appended
    // after its last flush (ids 4 and 5, say) never reached the file.
    await Deno.writeTextFile(`${dir}/.running`, "");
    const logs: string[] = [];
    const again = await HistoryStore.open(dir, {
      keep: 10,
      log: (line) => logs.push(line),
    });
    // The operator is told, once.
    assert.equal(
      logs.filter((l) => l.includes("did not shut down cleanly")).length,
      1,
      logs.join("\n"),
    );
    const next = again.append("dev", "bob", "after the crash").message.id;
    assert.equal(next, "1000004");
    const fresh = again.append("new", "bob", "a new room").message.id;
    assert.equal(fresh, "1000001");
    assert.deepEqual(again.after("dev", "3", 10).messages.map((m) => m.id), [
      "1000004",
    ]);
    assert.equal(again.after("dev", "3", 10).gap, true);
    assert.equal(again.after("dev", "5", 10).gap, true);
    assert.equal(again.after("dev", "1000004", 10).gap, false);
    assert.equal(again.after("dev", "2", 1).gap, false);
    await again.close();
    // Closed cleanly this time: the ids go on from the file, and nothing is
    // said of a crash.
    logs.length = 0;
    const third = await HistoryStore.open(dir, {
      keep: 10,
      log: (line) => logs.push(line),
    });
    assert.deepEqual(logs, []);
    assert.equal(third.append("dev", "carol", "x").message.id, "1000005");
    await third.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("after two crashes in a row, ids still never come round again", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const store = await HistoryStore.open(dir, { keep: 10 });
    for (let i = 1; i <= 3; i++) store.append("dev", "alice", `m${i}`);
    await store.close();
    // Run 2 started after a crash (base 1,000,000), handed out 1000004 and
    // crashed before writing it: its marker holds its base.
    await Deno.writeTextFile(`${dir}/.running`, "1000000");
    const again = await HistoryStore.open(dir, { keep: 10 });
    assert.equal(again.append("dev", "bob", "x").message.id, "2000004");
    assert.equal(again.append("new", "bob", "y").message.id, "2000001");
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a clean restart after a crash does not give out the crashed run's ids again, in rooms nobody wrote to since nor in rooms with no file", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const store = await HistoryStore.open(dir, { keep: 10 });
    for (let i = 1; i <= 3; i++) store.append("dev", "alice", `m${i}`);
    await store.close();
    // Run 2 handed out dev 4 and 5 and ghost 1 (a room with no file yet),
    // then crashed before writing them.
    await Deno.writeTextFile(`${dir}/.running`, "0");
    const recovered = await HistoryStore.open(dir, { keep: 10 });
    // Nobody writes to dev or ghost in run 3, which closes cleanly.
    assert.equal(recovered.after("ghost", "1", 10).gap, true);
    await recovered.close();
    const clean = await HistoryStore.open(dir, { keep: 10 });
    assert.equal(clean.after("dev", "5", 10).gap, true);
    assert.equal(clean.after("ghost", "1", 10).gap, true);
    assert.equal(clean.append("dev", "bob", "x").message.id, "1000004");
    assert.equal(clean.append("ghost", "bob", "y").message.id, "1000001");
    // No false alarms: a client that had seen nothing of a room new since
    // the crash, or has seen past the jump, has lost nothing.
    assert.equal(clean.after("quiet", "0", 10).gap, false);
    assert.equal(clean.after("ghost", "0", 10).gap, false);
    assert.equal(clean.after("dev", "1000004", 10).gap, false);
    assert.equal(clean.append("brand-new", "bob", "z").message.id, "1000001");
    assert.equal(clean.after("brand-new", "0", 10).gap, false);
    // A client that saw dev's messages before the crash is told.
    assert.equal(clean.after("dev", "3", 10).gap, true);
    assert.equal(clean.after("dev", "0", 10).gap, true);
    await clean.close();
    const floors = JSON.parse(
      await Deno.readTextFile(`${dir}/.id_floors.json`),
    );
    assert.deepEqual(floors, {
      version: 1,
      base: 1_000_000,
      rooms: { dev: 1_000_003 },
    });
    // The floors stay: the next clean start goes on from the files.
    const next = await HistoryStore.open(dir, { keep: 10 });
    assert.equal(next.append("dev", "bob", "z").message.id, "1000005");
    await next.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a damaged id floors file stops the start with its name and is left as it is", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/.id_floors.json`;
    for (
      const text of [
        "{",
        '{"version":1,"base":-1,"rooms":{}}',
        "[]",
        '{"version":2,"base":5,"rooms":{}}',
        '{"base":5,"rooms":{}}',
        '{"version":1,"base":5,"rooms":[7]}',
      ]
    ) {
      await Deno.writeTextFile(path, text);
      await assert.rejects(
        HistoryStore.open(dir),
        (err: Error) =>
          err.message.startsWith(`Cannot read the history file ${path}`),
      );
      assert.equal(await Deno.readTextFile(path), text);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a second store on a directory in use refuses to open, and leaves the first one's running mark alone", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const first = await HistoryStore.open(dir);
    first.append("dev", "alice", "one");
    await assert.rejects(
      HistoryStore.open(dir),
      (err: Error) =>
        err.message ===
          `Cannot use history directory ${dir}: another chat server holds its lock file ${dir}/.lock`,
    );
    assert.equal(await Deno.readTextFile(`${dir}/.running`), "0");
    assert.ok(!existsSync(`${dir}/.id_floors.json`));
    await first.close();
    const again = await HistoryStore.open(dir);
    assert.equal(again.append("dev", "bob", "two").message.id, "2");
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a store opening just as the one before it lets go waits for the lock instead of refusing", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const first = await HistoryStore.open(dir);
    first.append("dev", "alice", "one");
    const second = HistoryStore.open(dir);
    // Let go once the second has found the lock held at least once.
    await new Promise((resolve) => setTimeout(resolve, 10));
    await first.close();
    const again = await second;
    assert.equal(again.append("dev", "bob", "two").message.id, "2");
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a message is in its room's file as soon as append returns, long before the flush that syncs it", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const store = await HistoryStore.open(dir, { flushIntervalMs: 60_000 });
    const ids = [];
    ids.push(store.append("lobby", "alice", "one", "c1").message.id);
    ids.push(store.append("lobby", "bob", "two").message.id);
    const read = () => fileLines(dir, "lobby");
    assert.deepEqual(read().map((m) => m.id), ids);
    // The sender's client_id goes with it, for exactly-once after a restart.
    assert.equal(read()[0]?.client_id, "c1");
    ids.push(store.append("dev", "alice", "three").message.id);
    assert.match(Deno.readTextFileSync(`${dir}/dev.jsonl`), /"three"/);
    // Nothing is written twice by the flush or the close.
    await store.close();
    assert.deepEqual(read().map((m) => m.id), ids.slice(0, 2));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("messages written out while the room's file is being rewritten are in the new file at once, once and in order", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const store = await nineLinesForTwo(dir);
    // The flush compacts the file; while it waits for the disk, two more
    // messages are written out.
    const writing = store.flush();
    for (let i = 0; i < 5; i++) await Promise.resolve();
    for (const text of ["m10", "m11"]) {
      store.append("lobby", "alice", text);
    }
    await writing;
    const texts = () => fileLines(dir, "lobby").map((m) => m.text);
    assert.deepEqual(texts(), ["m8", "m9", "m10", "m11"]);
    await store.close();
    assert.deepEqual(texts(), ["m8", "m9", "m10", "m11"]);
    const again = await HistoryStore.open(dir, { keep: 2 });
    assert.deepEqual(again.recent("lobby", 5).messages.map((m) => m.text), [
      "m10",
      "m11",
    ]);
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("right after a restart, a message goes into its file at once, whether the file was longer than kept or ended in part of a line", async (t) => {
  for (const torn of [false, true]) {
    await t.step(torn ? "a torn end" : "longer than kept", async () => {
      const dir = await Deno.makeTempDir();
      try {
        const old = Date.parse("2020-01-01T00:00:00Z");
        const seed = await HistoryStore.open(dir, {
          keep: 5,
          now: () => old,
        });
        for (let i = 1; i <= 12; i++) seed.append("lobby", "a", `old${i}`);
        await seed.close();
        if (torn) {
          await Deno.writeTextFile(
            `${dir}/lobby.jsonl`,
            '{"type":"message","id":"13","ro',
            { append: true },
          );
        }
        const store = await HistoryStore.open(dir, {
          keep: 5,
          flushIntervalMs: 60_000,
        });
        // A torn end is repaired by the opening itself.
        assert.ok(Deno.readTextFileSync(`${dir}/lobby.jsonl`).endsWith("\n"));
        store.append("lobby", "bob", "delivered", "c-1");
        const texts = fileLines(dir, "lobby").map((m) => m.text);
        assert.equal(texts.at(-1), "delivered");
        assert.equal(texts.at(-2), "old12");
        await store.close();
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  }
});

Deno.test("a compaction that starts while a message waits to be written out writes it to the room's file first", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const store = await nineLinesForTwo(dir);
    // Appended in a message handler; its frames wait for the end of the turn,
    // and a flush with a compaction starts first.
    store.append("lobby", "bob", "waiting");
    const flushing = store.flush();
    await Promise.resolve();
    await Promise.resolve();
    assert.ok(
      Deno.readTextFileSync(`${dir}/lobby.jsonl`).includes('"waiting"'),
      "in the room's file, not only in the compaction's temporary file",
    );
    await flushing;
    await store.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the repair of a torn file at open and a flush never rewrite one file at once: a message written out after the open stays", async () => {
  const dir = await Deno.makeTempDir();
  const realOpen = Deno.open;
  try {
    const stored = (room: string, id: number, text: string) =>
      JSON.stringify({
        type: "message",
        id: String(id),
        room,
        from: "x",
        text,
        ts: new Date().toISOString(),
      });
    const a = Array.from({ length: 40 }, (_, i) => stored("a", i + 1, `a${i}`));
    await Deno.writeTextFile(
      `${dir}/a.jsonl`,
      a.join("\n") + '\n{"type":"message","id":"4',
    );
    const b = Array.from(
      { length: 5 },
      (_, i) => stored("b", i + 1, "y".repeat(1000)),
    );
    await Deno.writeTextFile(`${dir}/b.jsonl`, b.join("\n") + "\n");
    // A slow disk (injected into the runtime): the second rewrite of a.jsonl
    // syncs its temporary file 30 ms late.
    let tmpOpens = 0;
    Object.assign(Deno, {
      open: async (path: string, options: Deno.OpenOptions) => {
        const file = await realOpen(path, options);
        if (/\/a\.jsonl\..*\.tmp$/.test(path) && ++tmpOpens === 2) {
          const sync = file.sync.bind(file);
          Object.assign(file, {
            sync: async () => {
              await sync();
              await new Promise((resolve) => setTimeout(resolve, 30));
            },
          });
        }
        return file;
      },
    });
    // Over its budget at open (a shed asks for a flush), with a flush
    // interval shorter than the repair takes.
    const store = await HistoryStore.open(dir, {
      keep: 5,
      maxBytes: 8000,
      flushIntervalMs: 1,
    });
    store.append("a", "bob", "delivered");
    await store.flush();
    await store.close();
    assert.match(await Deno.readTextFile(`${dir}/a.jsonl`), /"delivered"/);
  } finally {
    Object.assign(Deno, { open: realOpen });
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("an append that fails just before a compaction that then succeeds leaves a clean close, not a crash's mark", async () => {
  const dir = await Deno.makeTempDir();
  const realOpenSync = Deno.openSync;
  try {
    const logs: string[] = [];
    const store = await HistoryStore.open(dir, {
      keep: 2,
      flushIntervalMs: 60_000,
      log: (line) => logs.push(line),
    });
    for (let i = 1; i <= 8; i++) {
      store.append("lobby", "alice", `m${i}`);
    }
    await store.flush();
    // Not yet written out when the close's flush compacts the room, whose
    // first append fails once (injected into the runtime).
    store.append("lobby", "alice", "m9");
    Object.assign(Deno, {
      openSync: () => {
        Object.assign(Deno, { openSync: realOpenSync });
        throw new Error("Input/output error (os error 5)");
      },
    });
    await store.close();
    assert.match(await Deno.readTextFile(`${dir}/lobby.jsonl`), /"m9"/);
    assert.ok(!existsSync(`${dir}/.running`), logs.join("\n"));
    assert.ok(!logs.some((l) => l.includes("could not be written")));
  } finally {
    Object.assign(Deno, { openSync: realOpenSync });
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a write that failed halfway is not appended twice: the retry rewrites the file, which opens again", async () => {
  const dir = await Deno.makeTempDir();
  const logs: string[] = [];
  const proto = Deno.FsFile.prototype;
  const syncData = proto.syncData;
  try {
    const store = await HistoryStore.open(dir, {
      flushIntervalMs: 60_000,
      log: (line) => logs.push(line),
    });
    store.append("lobby", "alice", "one");
    // The disk fails once, after the bytes went in (fault injected into the
    // runtime's file object, not into the store).
    proto.syncData = function () {
      proto.syncData = syncData;
      return Promise.reject(new Error("EIO (injected)"));
    };
    await store.flush();
    assert.equal(logs.length, 1, logs.join("\n"));
    await store.close();
    const lines = (await Deno.readTextFile(`${dir}/lobby.jsonl`)).trim()
      .split("\n");
    assert.deepEqual(lines.map((l) => JSON.parse(l).id), ["1"]);
    const again = await HistoryStore.open(dir);
    assert.deepEqual(again.recent("lobby", 5).messages.map((m) => m.text), [
      "one",
    ]);
    await again.close();
  } finally {
    proto.syncData = syncData;
    await Deno.remove(dir, { recursive: true });
  }
});

function existsSync(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
}

Deno.test("while the disk refuses writes a message is refused, not kept in memory only; the history says so once per room and writes what it keeps once it can", async () => {
  const dir = await Deno.makeTempDir();
  const logs: string[] = [];
  try {
    const store = await HistoryStore.open(`${dir}/history`, {
      flushIntervalMs: 60_000,
      log: (line) => logs.push(line),
    });
    store.append("lobby", "alice", "one", "c1");
    await store.flush();
    // Every write fails (as on a full disk) until the directory is back.
    await Deno.remove(`${dir}/history`, { recursive: true });
    assert.throws(
      () => store.append("lobby", "alice", "two", "c2"),
      HistoryWriteError,
    );
    await store.flush();
    assert.throws(
      () => store.append("lobby", "alice", "three"),
      (err) => err instanceof HistoryWriteError && /#lobby/.test(err.message),
    );
    await store.flush();
    const failures = logs.filter((l) => l.includes("cannot write"));
    assert.equal(failures.length, 1, logs.join("\n"));
    assert.match(failures[0]!, /lobby\.jsonl/);
    // Nothing refused is history, or counts for exactly-once.
    assert.deepEqual(store.recent("lobby", 5).messages.map((m) => m.text), [
      "one",
    ]);
    assert.deepEqual(store.sentSince(0).map((s) => s.clientId), ["c1"]);
    await Deno.mkdir(`${dir}/history`);
    await store.flush();
    assert.ok(logs.some((l) => /writing .*lobby\.jsonl again/.test(l)));
    // The next message takes the id after the last one kept: no hole that
    // a client would be told is a gap.
    assert.equal(store.append("lobby", "alice", "four").message.id, "2");
    assert.equal(store.after("lobby", "1", 5).gap, false);
    await store.close();
    const lines = (await Deno.readTextFile(`${dir}/history/lobby.jsonl`))
      .trim().split("\n");
    assert.deepEqual(lines.map((l) => JSON.parse(l).text), ["one", "four"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("past its byte budget the history trims the rooms holding the most, oldest first, and leaves the quiet ones whole", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const logs: string[] = [];
    const store = await HistoryStore.open(dir, {
      maxBytes: 100_000,
      log: (line) => logs.push(line),
    });
    const quiet = Array.from({ length: 20 }, (_, i) => `hello ${i + 1}`);
    for (const text of quiet) store.append("quiet", "alice", text);
    const long = "x".repeat(3990);
    for (let i = 1; i <= 40; i++) {
      store.append("flood", "mallory", `${i} ${long}`);
      assert.ok(store.bytes <= 100_000, `${store.bytes} bytes after ${i}`);
    }
    assert.deepEqual(
      store.recent("quiet", 50).messages.map((m) => m.text),
      quiet,
    );
    // The flood keeps its newest messages, with no hole among them, and
    // asking from the start says some are gone.
    const flood = store.after("flood", "0", 500);
    assert.equal(flood.gap, true);
    const ids = flood.messages.map((m) => Number(m.id));
    assert.ok(ids.length > 0 && ids.length < 12, `${ids.length} kept`);
    assert.deepEqual(ids, ids.map((_, i) => 41 - ids.length + i));
    // Shed in large steps (to half the budget), so said a few times, not
    // once a message.
    const sheds = logs.filter((l) => l.includes("memory budget")).length;
    assert.ok(sheds > 0 && sheds < 10, `${sheds} sheds`);
    await store.close();
    // The shed room's file holds what is kept, no more.
    const lines = (await Deno.readTextFile(`${dir}/flood.jsonl`)).trimEnd()
      .split("\n");
    assert.deepEqual(lines.map((l) => Number(JSON.parse(l).id)), ids);
    // A smaller budget sheds at open; every room keeps its newest message.
    const again = await HistoryStore.open(dir, { maxBytes: 30_000 });
    assert.ok(again.bytes <= 15_000, `${again.bytes} bytes`);
    assert.equal(again.recent("quiet", 50).messages.length, 20);
    assert.deepEqual(again.recent("flood", 50).messages.map((m) => m.id), [
      "40",
    ]);
    assert.equal(again.append("flood", "mallory", "next").message.id, "41");
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Every kept message of a room, paging on with `after`. */
function allKept(store: HistoryStore, room: string): RoomMessage[] {
  const all: RoomMessage[] = [];
  let after = "0";
  for (;;) {
    const page = store.after(room, after, 500).messages;
    if (page.length === 0) return all;
    all.push(...page);
    after = page.at(-1)!.id;
  }
}

Deno.test("a shed over many rooms keeps every room's newest message, the byte count true, and the exactly-once window across a reopen", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const rooms = Array.from({ length: 300 }, (_, i) => `r${i}`);
    const open = () => HistoryStore.open(dir, { maxBytes: 2_000_000 });
    const store = await open();
    // Room i gets i % 12 + 1 messages of about 2 KB (3.9 MB in all), each
    // sent with a client_id.
    const sent: string[] = [];
    for (let round = 0; round < 12; round++) {
      for (const [i, room] of rooms.entries()) {
        if (round > i % 12) continue;
        const clientId = `c${sent.length}`;
        sent.push(clientId);
        store.append(room, "m", `${clientId} ${"z".repeat(900)}`, clientId);
      }
    }
    const bytesOf = (messages: RoomMessage[]) =>
      messages.reduce((sum, m) => sum + 2 * m.text.length + 200, 0);
    const check = (s: HistoryStore) => {
      assert.ok(s.bytes <= 2_000_000, `${s.bytes} bytes`);
      const kept = rooms.map((room) => allKept(s, room));
      assert.equal(s.bytes, bytesOf(kept.flat()), "bytes match what is kept");
      for (const [i, messages] of kept.entries()) {
        assert.equal(messages.at(-1)?.id, String(i % 12 + 1), rooms[i]);
      }
      return kept.flat().length;
    };
    const before = check(store);
    assert.ok(before < sent.length, `${before} of ${sent.length} kept`);
    await store.close();
    // Reopened: what the files hold, within the budget again, and every
    // client_id sent still known (the window).
    const again = await open();
    check(again);
    const known = new Set(again.sentSince(0).map((s) => s.clientId));
    assert.deepEqual(sent.filter((id) => !known.has(id)), []);
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a shed while the room's file is being rewritten is not lost: the file ends as what is kept", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const store = await HistoryStore.open(dir, { maxBytes: 60_000 });
    const long = "w".repeat(3990);
    for (let i = 1; i <= 8; i++) store.append("flood", "m", `${i} ${long}`);
    // Passing the budget sheds and asks for a rewrite; start it...
    store.append("flood", "m", `9 ${long}`);
    const writing = store.flush();
    // ...and, while it waits for the disk, pass the budget again.
    for (let i = 0; i < 5; i++) await Promise.resolve();
    for (let i = 10; i <= 16; i++) store.append("flood", "m", `${i} ${long}`);
    await writing;
    await store.close();
    const kept = (await Deno.readTextFile(`${dir}/flood.jsonl`)).trimEnd()
      .split("\n").map((l) => Number(JSON.parse(l).id));
    const again = await HistoryStore.open(dir, { maxBytes: 60_000 });
    assert.deepEqual(
      kept,
      allKept(again, "flood").map((m) => Number(m.id)),
    );
    assert.ok(kept.length < 8, `${kept.length} lines`);
    assert.equal(kept.at(-1), 16);
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a shed reaches its target when a room's newest message alone is over the level", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const store = await HistoryStore.open(dir, { maxBytes: 50_000 });
    // Room b: 100 small messages (25,000 bytes as counted); then room a
    // gets two large ones, the second passing the budget.
    for (let i = 0; i < 100; i++) store.append("b", "m", "s".repeat(25));
    store.append("a", "m", "L".repeat(8100));
    store.append("a", "m", "L".repeat(8100));
    // Half the budget is reached, room a keeping its newest (16,400), b
    // making up the rest.
    assert.ok(store.bytes <= 25_000, `${store.bytes} bytes`);
    assert.equal(store.recent("a", 50).messages.length, 1);
    await store.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
