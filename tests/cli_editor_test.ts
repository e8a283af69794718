/**
 * The line editor on a terminal, checked on a small screen model: what the
 * bytes it writes leave on the screen, not the bytes themselves.
 */
import assert from "node:assert/strict";
import { runApp } from "../cli/app.ts";
import { LineReader } from "../cli/line_reader.ts";
import { displayWidth, splitGraphemes } from "../cli/render.ts";
import { PASSWORD, register, startServers } from "./_cli_helpers.ts";
import { waitFor } from "./_harness.ts";

/**
 * A terminal screen of `columns` columns: text with wrapping, CR, LF (as
 * CR LF), cursor up/right, erase below, colour codes ignored.
 */
class Screen {
  rows: string[][] = [[]];
  row = 0;
  col = 0;
  constructor(readonly columns: number) {}

  writeSync(bytes: Uint8Array): number {
    const text = new TextDecoder().decode(bytes);
    // deno-lint-ignore no-control-regex
    for (const part of text.split(/(\x1b\[[0-9;]*[A-Za-z]|\r|\n)/)) {
      if (part === "") continue;
      if (part === "\r") this.col = 0;
      else if (part === "\n") this.#down();
      else if (part.startsWith("\x1b[")) this.#control(part);
      else for (const g of splitGraphemes(part)) this.#put(g);
    }
    return bytes.length;
  }

  /** The screen's rows as text, without trailing blank rows. */
  get lines(): string[] {
    const lines = this.rows.map((r) => r.join(""));
    while (lines.length > 0 && lines.at(-1) === "") lines.pop();
    return lines;
  }

  #down(): void {
    this.row++;
    this.col = 0;
    while (this.rows.length <= this.row) this.rows.push([]);
  }

  #put(g: string): void {
    const width = displayWidth(g);
    if (this.col + width > this.columns) this.#down();
    const cells = this.rows[this.row]!;
    while (cells.length < this.col) cells.push(" ");
    cells[this.col] = g;
    for (let i = 1; i < width; i++) cells[this.col + i] = "";
    this.col += width;
  }

  #control(seq: string): void {
    const n = Number(seq.slice(2, -1) || "1");
    const final = seq.at(-1);
    this.col = Math.min(this.col, this.columns - 1);
    if (final === "A") this.row = Math.max(0, this.row - n);
    else if (final === "C") this.col = Math.min(this.columns - 1, this.col + n);
    else if (final === "J") {
      this.rows[this.row]!.length = Math.min(
        this.rows[this.row]!.length,
        this.col,
      );
      this.rows.length = this.row + 1;
    }
  }
}

function terminal(columns: number) {
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const input = new ReadableStream<Uint8Array>({
    start(c) {
      controller = c;
    },
  });
  const screen = new Screen(columns);
  const reader = new LineReader({
    input,
    output: screen,
    terminal: { setRaw: () => {}, columns: () => screen.columns },
  });
  const type = async (keys: string) => {
    controller.enqueue(new TextEncoder().encode(keys));
    // The reader takes the keys on its next turn.
    await new Promise((resolve) => setTimeout(resolve, 0));
  };
  return { screen, reader, type, end: () => controller.close() };
}

Deno.test("arrows, Home, End, Delete and Backspace edit where the cursor is, one character as seen at a time", async () => {
  const { screen, reader, type } = terminal(40);
  const line = reader.readLine({ prompt: "> " });
  await type("hello world\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dbig ");
  assert.deepEqual(screen.lines, ["> hello big world"]);
  assert.equal(screen.col, "> hello big ".length);
  await type("\x1b[HX\x1bOF!\x01\x1b[3~");
  assert.deepEqual(screen.lines, ["> hello big world!"]);
  // An emoji with its skin tone, a flag and a decomposed é go whole.
  await type("\x05 👍🏽🇫🇷e\u0301\x7f\x7f\x7f");
  assert.deepEqual(screen.lines, ["> hello big world! "]);
  // A lone Esc (a read of its own) does not eat the key after it.
  await type("\x1b");
  await type("ok\r");
  assert.equal(await line, "hello big world! ok");
  reader.close();
});

Deno.test("Alt+B/F/D/Backspace, Ctrl+Left/Right, Ctrl+W and Ctrl+K edit by words as in readline; any other Alt+key types nothing", async () => {
  const { screen, reader, type } = terminal(60);
  const line = reader.readLine({ prompt: "> " });
  await type("one two  three");
  // Alt+B twice: before "two"; Alt+F: after it.
  await type("\x1bb");
  await type("\x1bb");
  assert.equal(screen.col, "> one ".length);
  await type("\x1bf");
  assert.equal(screen.col, "> one two".length);
  // Ctrl+Left and Alt+Left, Ctrl+Right.
  await type("\x1b[1;5D");
  assert.equal(screen.col, "> one ".length);
  await type("\x1b[1;3D");
  assert.equal(screen.col, "> ".length);
  await type("\x1b[1;5C");
  assert.equal(screen.col, "> one".length);
  // Alt+D: the word after the cursor; Alt+X types nothing.
  await type("\x1bd\x1bx");
  assert.deepEqual(screen.lines, ["> one  three"]);
  // Ctrl+K: all after the cursor; Alt+Backspace: the word before it.
  await type("\x0b");
  assert.deepEqual(screen.lines, ["> one"]);
  await type(" two\x1b\x7f");
  assert.deepEqual(screen.lines, ["> one "]);
  await type("end\r");
  assert.equal(await line, "one end");
  reader.close();
});

Deno.test("Tab typed alone asks the completer; a Tab within pasted text stays a space", async () => {
  const { screen, reader, type } = terminal(40);
  reader.setCompleter((before) =>
    before.endsWith("al") ? `${before}ice: ` : undefined
  );
  const line = reader.readLine({ prompt: "> " });
  await type("al");
  await type("\t");
  assert.deepEqual(screen.lines, ["> alice: "]);
  assert.equal(screen.col, "> alice: ".length);
  // Nothing to complete: nothing happens.
  await type("\t");
  assert.deepEqual(screen.lines, ["> alice: "]);
  await type("a\tal\r");
  assert.equal(await line, "alice: a al");
  reader.close();
});

Deno.test("Up and Down recall the lines entered before; passwords are never kept", async () => {
  const { reader, type } = terminal(40);
  const first = reader.readLine({ prompt: "> ", history: true });
  await type("one\r");
  assert.equal(await first, "one");
  const secret = reader.readLine({ prompt: "Password: ", echo: false });
  await type("hunter22\r");
  assert.equal(await secret, "hunter22");
  const second = reader.readLine({ prompt: "> ", history: true });
  await type("two\r");
  assert.equal(await second, "two");
  const third = reader.readLine({ prompt: "> ", history: true });
  await type("\x1b[A\x1b[A\x1b[A\r");
  assert.equal(await third, "one");
  const fourth = reader.readLine({ prompt: "> ", history: true });
  await type("\x1b[A\x1b[A\x1b[B!\r");
  assert.equal(await fourth, "one!");
  reader.close();
});

Deno.test("wide characters and lines longer than the screen leave no stale rows when lines arrive above", async () => {
  const { screen, reader, type } = terminal(20);
  const line = reader.readLine({ prompt: "#l> " });
  // 4 + 2 * 10 columns: two rows.
  await type("漢".repeat(10));
  assert.deepEqual(screen.lines, ["#l> " + "漢".repeat(8), "漢漢"]);
  reader.print("[09:00] <bob> hi");
  await type("\x7f");
  assert.deepEqual(screen.lines, [
    "[09:00] <bob> hi",
    "#l> " + "漢".repeat(8),
    "漢",
  ]);
  // A combining accent takes no column: 16 of them still fit on one row.
  await type("\x15" + "e\u0301".repeat(16));
  reader.print("[09:01] <bob> yo");
  assert.deepEqual(screen.lines, [
    "[09:00] <bob> hi",
    "[09:01] <bob> yo",
    "#l> " + "e\u0301".repeat(16),
  ]);
  // A pasted line far wider than the screen is shown as a window of at
  // most three rows around the cursor.
  await type("\x15" + "x".repeat(500));
  reader.print("[09:02] <bob> ok");
  assert.equal(screen.lines.length, 3 + 3);
  assert.deepEqual(screen.lines.slice(0, 3), [
    "[09:00] <bob> hi",
    "[09:01] <bob> yo",
    "[09:02] <bob> ok",
  ]);
  assert.ok(screen.lines[3]!.startsWith("#l> …xxx"), screen.lines[3]);
  // At its start, the window still takes its three rows, from there on.
  await type("\x01");
  assert.equal(screen.lines.length, 3 + 3);
  assert.ok(screen.lines[3]!.startsWith("#l> xxx"), screen.lines[3]);
  assert.ok(screen.lines[5]!.endsWith("x…"), screen.lines[5]);
  await type("\r");
  assert.equal(await line, "x".repeat(500));
  reader.close();
});

Deno.test("a footer longer than a few rows is cut, with the rest counted", async () => {
  const { screen, reader, type } = terminal(30);
  const line = reader.readLine({ prompt: "> " });
  reader.setFooter(Array.from({ length: 30 }, (_, i) => `pending ${i}`));
  await type("abc");
  reader.print("[09:00] <bob> hi");
  assert.deepEqual(screen.lines, [
    "[09:00] <bob> hi",
    "pending 0",
    "pending 1",
    "pending 2",
    "pending 3",
    "… and 26 more",
    "> abc",
  ]);
  await type("\r");
  assert.equal(await line, "abc");
  reader.close();
});

Deno.test("a wide character that does not fit in a row's last column goes to the next row, and the cursor follows it", async (t) => {
  // Both leave one column free at the end of the first row.
  for (const [columns, prompt] of [[20, "#lo> "], [21, "#l> "]] as const) {
    await t.step(`${columns} columns`, async () => {
      const { screen, reader, type } = terminal(columns);
      const line = reader.readLine({ prompt });
      await type("漢".repeat(9));
      reader.print("[09:00] <bob> hi");
      await type("\x1b[D");
      // The first row ends where a wide character still fits.
      const first = Math.floor((columns - prompt.length) / 2);
      assert.deepEqual(screen.lines, [
        "[09:00] <bob> hi",
        prompt + "漢".repeat(first),
        "漢".repeat(9 - first),
      ]);
      // The cursor is on the last character, not inside one.
      assert.deepEqual([screen.row, screen.col], [2, 2 * (8 - first)]);
      await type("X");
      reader.print("[09:01] <bob> yo");
      assert.deepEqual(screen.lines.slice(0, 2), [
        "[09:00] <bob> hi",
        "[09:01] <bob> yo",
      ]);
      assert.equal(
        screen.lines.slice(2).join(""),
        prompt + "漢".repeat(8) + "X漢",
      );
      await type("\r");
      assert.equal(await line, "漢".repeat(8) + "X漢");
      reader.close();
    });
  }
});

Deno.test("Up and Down keep the line being typed; only the chat's lines are recalled", async () => {
  const { reader, type } = terminal(40);
  const menu = reader.readLine({ prompt: "Choose 1 or 2: " });
  await type("1\r");
  assert.equal(await menu, "1");
  const sent = reader.readLine({ prompt: "> ", history: true });
  await type("sent before\r");
  assert.equal(await sent, "sent before");
  const draft = reader.readLine({ prompt: "> ", history: true });
  await type("a long draft\x1b[A\x1b[A\x1b[B\r");
  assert.equal(await draft, "a long draft");
  // The oldest is the chat's first line: the menu's answer is not kept.
  const again = reader.readLine({ prompt: "> ", history: true });
  await type("\x1b[A\x1b[A\x1b[A\r");
  assert.equal(await again, "sent before");
  reader.close();
});

Deno.test("an empty username on a terminal is asked for again", async () => {
  const { screen, reader, type, end } = terminal(60);
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const authUrl = `http://127.0.0.1:${listener.addr.port}`;
  listener.close();
  const errors: string[] = [];
  const exited = runApp(["--auth-url", authUrl], {
    env: () => undefined,
    lines: () => reader,
    out: (line) => reader.print(line),
    err: (line) => errors.push(line),
    color: false,
  });
  await type("1\r");
  await type("\r");
  await type("  \r");
  assert.equal(
    screen.lines.filter((l) => l.startsWith("Username:")).length,
    3,
    screen.lines.join("\n"),
  );
  await type("alice\r");
  assert.ok(
    screen.lines.at(-1)!.startsWith("Password:"),
    screen.lines.join("\n"),
  );
  await type("secretpw1\r");
  // The auth server is not there: one line, and the menu again.
  await type("");
  end();
  assert.equal(await exited, 0);
  assert.equal(errors.length, 1, errors.join("\n"));
  assert.match(errors[0]!, /cannot reach the auth server/);
});

Deno.test("on a terminal, the menu's register refuses a name that breaks the rules before asking for the password", async () => {
  const servers = await startServers();
  try {
    const { screen, reader, type, end } = terminal(80);
    const errors: string[] = [];
    const exited = runApp(["--auth-url", servers.authUrl], {
      env: () => undefined,
      lines: () => reader,
      out: (line) => reader.print(line),
      err: (line) => errors.push(line),
      color: false,
    });
    await type("2\r");
    await type("ab\r");
    await waitFor(() => errors.length > 0);
    assert.deepEqual(errors, [
      'chatroom: cannot register "ab": a username is 3 to 32 characters of A-Z, a-z, 0-9, _ . - (invalid_username)',
    ]);
    // The menu again, no password asked.
    await waitFor(() => screen.lines.at(-1)!.startsWith("Choose 1 or 2:"));
    assert.ok(
      !screen.lines.some((l) => l.startsWith("Password:")),
      screen.lines.join("\n"),
    );
    // A valid name goes on to the password and registers.
    await type("2\r");
    await type("alice\r");
    await type(`${PASSWORD}\r`);
    await waitFor(() =>
      screen.lines.some((l) => l.startsWith("registered alice"))
    );
    end();
    assert.equal(await exited, 0);
    assert.equal(errors.length, 1, errors.join("\n"));
  } finally {
    await servers.close();
  }
});

Deno.test("the pending rows' #room marks follow the current room when it changes while offline", async () => {
  const servers = await startServers();
  const { screen, reader, type, end } = terminal(80);
  try {
    await register(servers.authUrl, "alice");
    const exited = runApp([
      "login",
      "--user",
      "alice",
      "--auth-url",
      servers.authUrl,
    ], {
      env: () => undefined,
      lines: () => reader,
      out: (line) => reader.print(line),
      err: (line) => reader.print(line),
      color: false,
    }).catch((err) => err);
    const shows = (match: (lines: string[]) => boolean) =>
      waitFor(() => match(screen.lines), 5000).catch(() => {
        throw new Error(`not on the screen:\n${screen.lines.join("\n")}`);
      });
    await shows((l) => l.some((x) => x.startsWith("Password:")));
    await type(`${PASSWORD}\r`);
    await shows((l) => l.at(-1) === "#lobby> ");
    await servers.chat.shutdown();
    await shows((l) => l.at(-1) === "(offline) #lobby> ");
    await type("in lobby\r/join dev\r");
    await shows((l) => l.at(-1) === "(offline) #dev> ");
    await type("in dev\r");
    await shows((l) => l.some((x) => x.includes("in dev (pending)")));
    await type("/join lobby\r");
    await shows((l) => l.at(-1) === "(offline) #lobby> ");
    const rows = screen.lines.filter((l) => l.endsWith("(pending)"));
    assert.deepEqual(rows, [
      "[--:--] <alice> in lobby (pending)",
      "[--:--] #dev <alice> in dev (pending)",
    ]);
    end();
    await exited;
  } finally {
    reader.close();
    await servers.close();
  }
});

Deno.test("a line typed ahead of its prompt stays on screen after it, as one typed at the prompt does (a password without its characters)", async () => {
  const { screen, reader, type, end } = terminal(60);
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const authUrl = `http://127.0.0.1:${listener.addr.port}`;
  listener.close();
  const exited = runApp(["--auth-url", authUrl], {
    env: () => undefined,
    lines: () => reader,
    out: (line) => reader.print(line),
    err: (line) => reader.print(line),
    color: false,
  });
  // All at once, before the username and password prompts are drawn.
  await type("2\ralice\rsecretpw1\r");
  await waitFor(() => screen.lines.some((l) => l.includes("cannot reach")));
  const shown = screen.lines.join("\n");
  assert.ok(screen.lines.includes("Username: alice"), shown);
  assert.ok(screen.lines.includes("Password: "), shown);
  assert.ok(!shown.includes("secretpw1"), shown);
  end();
  assert.equal(await exited, 0);
});
