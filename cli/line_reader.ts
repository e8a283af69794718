/**
 * The one line reader over stdin that the menu, the password prompt and the
 * chat share, so that piped input is never lost between them (a reader per
 * question drops what the previous one had buffered).
 *
 * From a pipe it splits lines and queues them until asked. On a terminal it is
 * a small line editor in raw mode: it echoes (or, for passwords, hides) what is
 * typed, moves the cursor (arrows, Home, End, Ctrl+A/E/B/F), deletes (Backspace,
 * Delete, Ctrl+D/U/W) a user-perceived character at a time, recalls earlier
 * lines (Up, Down), and {@linkcode LineReader.print} writes a line *above* the
 * prompt and the line being typed, then redraws them, so arriving messages
 * never garble the input. Widths are terminal columns (CJK and emoji take
 * two); what it draws is at most a few rows, however long the line or the
 * footer, and is measured again at the current width when it is redrawn, so a
 * resized terminal (see {@linkcode LineReader.resized}) keeps it whole. Raw mode is on only while a line is being read and is restored in
 * `finally`, also when Ctrl+C ends the read.
 *
 * @module
 */
import { Interrupted } from "./cli_error.ts";
import { displayWidth, splitGraphemes, visibleLength } from "./render.ts";

/** A synchronous byte sink such as `Deno.stdout`. */
export interface SyncWriter {
  writeSync(p: Uint8Array): number;
}

/** The terminal behind stdin, when there is one. */
export interface TerminalControl {
  /** Switches raw mode on or off (`Deno.stdin.setRaw`). */
  setRaw(on: boolean): void;
  /** The width of the terminal in columns. */
  columns(): number;
  /**
   * A terminal the reader must not move the cursor on (`TERM=dumb`, such as
   * an Emacs shell buffer, or output that does not go to it): lines are read
   * in the terminal's own line mode (it echoes and edits them), prompts are
   * written as they are, printed lines are written as they come; only
   * passwords are read in raw mode, to hide them.
   */
  plain?: boolean;
}

/** How the reader is wired; everything defaults to the process's stdio. */
export interface LineReaderOptions {
  /** The bytes typed or piped in. */
  input?: ReadableStream<Uint8Array>;
  /** Where {@linkcode LineReader.print} writes. */
  output?: SyncWriter;
  /** The terminal behind `input`, or `null` when input is a pipe or file. */
  terminal?: TerminalControl | null;
  /**
   * Where the prompt and the echo go on a terminal; when it is not `output`
   * (stdout redirected), printed lines need no redraw around them.
   */
  editorOutput?: SyncWriter;
}

/** How one line is read. */
export interface ReadLineOptions {
  /**
   * Shown before the input on a terminal; without one, written as a line of
   * its own to the output (unless `transient`).
   */
  prompt?: string;
  /** Whether typed characters are shown (false for passwords). */
  echo?: boolean;
  /** Whether the typed line disappears once entered (chat redraws it itself). */
  transient?: boolean;
  /** Ends the wait early; the read then rejects with the signal's reason. */
  signal?: AbortSignal;
  /** Whether the line joins those Up and Down recall (the chat's do). */
  history?: boolean;
}

const encoder = new TextEncoder();
/** Footer lines shown at most; the rest are counted in the last one. */
const MAX_FOOTER_ROWS = 5;
/** Rows the prompt and the line being typed take at most. */
const MAX_INPUT_ROWS = 3;
/** Lines recalled with Up. */
const MAX_HISTORY = 200;

/** One shared line reader over stdin; see the module documentation. */
export class LineReader {
  #input: ReadableStream<Uint8Array>;
  #output: SyncWriter;
  #terminal: TerminalControl | null;
  #editorOutput: SyncWriter;
  #editorShares: boolean;
  #plain: boolean;
  #onInterrupt: (() => void) | null = null;

  #queue: (string | null)[] = [];
  #eof = false;
  #interruptPending = false;
  #waiter:
    | { resolve: (line: string | null) => void; reject: (err: unknown) => void }
    | null = null;
  #started = false;
  #closed = false;
  #streamReader: ReadableStreamDefaultReader<Uint8Array> | null = null;

  // Pipe mode: the unfinished last line.
  #partial = "";
  // Terminal mode: the editor.
  #buffer = "";
  /** Where the cursor is in `#buffer` (a UTF-16 index at a grapheme boundary). */
  #cursor = 0;
  /**
   * Lines entered where history was asked for, oldest first; which one Up
   * last showed; and the line being typed before Up was first pressed.
   */
  #history: string[] = [];
  #historyAt = 0;
  #draft = "";
  #active: ReadLineOptions | null = null;
  #footer: string[] = [];
  /**
   * What is on screen of the footer and the input: the widths of the footer
   * rows, and how many columns precede the cursor on the input's rows;
   * null when nothing is drawn. Rows are counted from these at the width of
   * the moment, so that a terminal that re-wraps on resize is followed.
   */
  #drawn: { footer: number[]; input: number[]; cursor: number } | null = null;
  #escape: "" | "esc" | "csi" = "";
  #csi = "";
  #completer: ((before: string) => string | undefined) | null = null;
  /** Whether the read being taken is one key (a Tab alone completes). */
  #alone = false;
  /** Counts what `#feed` was given: an Esc and a key in one read are Alt+key. */
  #chunk = 0;
  #escChunk = -1;
  #lastWasCr = false;
  #raw = false;

  /** Builds a reader; it starts reading its input on the first `readLine`. */
  constructor(options: LineReaderOptions = {}) {
    const {
      input = Deno.stdin.readable,
      output = Deno.stdout,
      terminal = null,
      editorOutput = output,
    } = options;
    this.#input = input;
    this.#output = output;
    this.#terminal = terminal;
    this.#editorOutput = editorOutput;
    this.#editorShares = editorOutput === output;
    this.#plain = terminal?.plain ?? false;
  }

  /** Whether a person types at a terminal (input edited here). */
  get interactive(): boolean {
    return this.#terminal !== null;
  }

  /** Whether footer lines ({@linkcode LineReader.setFooter}) are shown. */
  get showsFooter(): boolean {
    return this.#terminal !== null && !this.#plain;
  }

  /**
   * The next line, without its line ending; `null` at end of input (or Ctrl+D
   * on an empty line). Rejects with {@linkcode Interrupted} on Ctrl+C.
   */
  readLine(options: ReadLineOptions = {}): Promise<string | null> {
    if (this.#closed) return Promise.resolve(null);
    if (this.#waiter !== null) {
      return Promise.reject(new Error("Cannot read two lines at once"));
    }
    if (this.#interruptPending) {
      this.#interruptPending = false;
      return Promise.reject(new Interrupted());
    }
    this.#start();
    // Without a terminal the prompt is a line of its own on stdout, before
    // every read (also of a line already piped in), so that a script driving
    // the client can wait for it; the chat's own prompt is left out.
    if (this.#terminal === null && !options.transient && options.prompt) {
      this.#write(this.#output, `${options.prompt.trimEnd()}\n`);
    }
    if (this.#queue.length > 0) {
      const line = this.#queue.shift() ?? null;
      if (
        line !== null && this.#terminal !== null && !this.#plain &&
        !options.transient && options.prompt !== undefined
      ) {
        // A line typed ahead stays on screen after its prompt, as one typed
        // at the prompt does (a hidden one without its characters).
        this.#clear();
        this.#write(
          this.#editorOutput,
          `${options.prompt}${options.echo === false ? "" : line}\n`,
        );
        this.#draw();
      }
      return Promise.resolve(line);
    }
    if (this.#eof) return Promise.resolve(null);
    const { signal } = options;
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<string | null>((resolve, reject) => {
      const onAbort = () => {
        this.#buffer = "";
        this.#cursor = 0;
        this.#historyAt = this.#history.length;
        this.#draft = "";
        this.#finishRead();
        reject(signal?.reason);
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#waiter = {
        resolve: (line) => {
          signal?.removeEventListener("abort", onAbort);
          this.#finishRead();
          resolve(line);
        },
        reject: (err) => {
          signal?.removeEventListener("abort", onAbort);
          this.#finishRead();
          reject(err);
        },
      };
      if (this.#terminal !== null && this.#plain) {
        // Passwords alone in raw mode (hidden); the chat's own lines get no
        // prompt: it could not be kept below the lines arriving meanwhile.
        if (options.echo === false) this.#setRaw(true);
        this.#active = { echo: true, ...options };
        if (!options.transient) {
          this.#write(this.#editorOutput, options.prompt ?? "");
        }
      } else if (this.#terminal !== null) {
        this.#setRaw(true);
        this.#active = { echo: true, ...options };
        this.#redraw();
      }
    });
  }

  /** Changes the prompt of the line being read (e.g. after a room change). */
  setPrompt(prompt: string): void {
    if (this.#active === null || this.#active.prompt === prompt) return;
    this.#clear();
    this.#active = { ...this.#active, prompt };
    this.#draw();
  }

  /** Writes one line of output above the prompt and the line being typed. */
  print(line: string, options: { bell?: boolean } = {}): void {
    // The terminal's bell (its "activity" alert in tmux and screen) only on
    // a terminal the editor draws on: never into a pipe or a log.
    const bell = options.bell === true && this.#terminal !== null &&
        !this.#plain
      ? "\x07"
      : "";
    if (this.#terminal !== null && this.#editorShares && !this.#plain) {
      this.#clear();
      this.#write(this.#output, line + "\n" + bell);
      this.#draw();
    } else {
      this.#write(this.#output, line + "\n" + bell);
    }
  }

  /**
   * Lines kept just above the prompt on a terminal until replaced (the
   * user's messages waiting for their echo); ignored when not interactive.
   */
  setFooter(lines: string[]): void {
    if (!this.showsFooter) return;
    this.#clear();
    this.#footer = [...lines];
    this.#draw();
  }

  /**
   * What Ctrl+C does, for a signal (SIGINT on a pipe, SIGTERM, SIGHUP): the
   * handler of {@linkcode LineReader.setInterruptHandler} runs if one is
   * set; else the line being read is given up and its read rejects with
   * {@linkcode Interrupted}. Returns false, doing nothing, when there is
   * neither.
   */
  interrupt(): boolean {
    if (this.#onInterrupt !== null) {
      this.#onInterrupt();
      return true;
    }
    if (this.#waiter === null || this.#closed) return false;
    this.#interrupt();
    return true;
  }

  /**
   * What {@linkcode LineReader.interrupt} does instead while set (a chat
   * session ends itself, read or no read); `null` to take it back.
   */
  /**
   * What Tab does in a line being typed: `complete` gets the text before the
   * cursor and gives what replaces it (`undefined`: nothing to complete).
   * A Tab within pasted text stays a space.
   */
  setCompleter(
    complete: ((before: string) => string | undefined) | null,
  ): void {
    this.#completer = complete;
  }

  setInterruptHandler(handler: (() => void) | null): void {
    this.#onInterrupt = handler;
  }

  /** The terminal changed size: draws the footer and the input again. */
  resized(): void {
    this.#redraw();
  }

  /** Stops reading, clears the prompt and restores the terminal. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#active = null;
    this.#footer = [];
    this.#clear();
    this.#setRaw(false);
    this.#streamReader?.cancel().catch(() => {});
    this.#waiter?.resolve(null);
  }

  #start(): void {
    if (this.#started) return;
    this.#started = true;
    this.#pump();
  }

  async #pump(): Promise<void> {
    const decoder = new TextDecoder();
    try {
      const reader = this.#input.getReader();
      this.#streamReader = reader;
      for (;;) {
        const { value, done } = await reader.read();
        if (done || this.#closed) break;
        this.#feed(decoder.decode(value, { stream: true }));
      }
      this.#feed(decoder.decode());
    } catch {
      // A stdin that fails to read is treated as ended.
    }
    if (this.#partial !== "") {
      this.#queue.push(this.#partial);
      this.#partial = "";
    }
    this.#eof = true;
    this.#deliver();
  }

  #feed(text: string): void {
    if (text === "") return;
    if (this.#terminal === null || (this.#plain && !this.#raw)) {
      const parts = (this.#partial + text).split("\n");
      this.#partial = parts.pop() ?? "";
      for (const part of parts) {
        this.#queue.push(part.endsWith("\r") ? part.slice(0, -1) : part);
      }
      this.#deliver();
      return;
    }
    this.#chunk++;
    this.#alone = text.length === 1;
    for (const char of text) this.#key(char);
  }

  #key(char: string): void {
    const code = char.codePointAt(0) ?? 0;
    if (this.#escape === "esc") {
      if (char === "[" || char === "O") {
        this.#escape = "csi";
        this.#csi = char === "O" ? "O" : "";
        return;
      }
      this.#escape = "";
      // Alt with a key comes in the same read as its Esc (a terminal sends
      // both at once); a lone Esc comes alone, and the key after it counts
      // on its own. Alt+B/F/D/Backspace act on words, as in readline; any
      // other Alt+key does nothing, rather than type its letter.
      if (this.#escChunk === this.#chunk) return this.#alt(char);
    } else if (this.#escape === "csi") {
      if (code >= 0x40 && code <= 0x7e) {
        this.#escape = "";
        this.#sequence(this.#csi.replace(/^O/, ""), char);
      } else if (this.#csi.length < 16) this.#csi += char;
      return;
    }
    const wasCr = this.#lastWasCr;
    this.#lastWasCr = char === "\r";
    switch (char) {
      case "\x1b":
        this.#escape = "esc";
        this.#escChunk = this.#chunk;
        return;
      case "\r":
        this.#enter();
        return;
      case "\n":
        if (!wasCr) this.#enter();
        return;
      case "\x7f":
      case "\b":
        return this.#deleteTo(this.#graphemeBefore());
      case "\x01": // Ctrl+A
        return this.#move(0);
      case "\x05": // Ctrl+E
        return this.#move(this.#buffer.length);
      case "\x02": // Ctrl+B
        return this.#move(this.#graphemeBefore());
      case "\x06": // Ctrl+F
        return this.#move(this.#graphemeAfter());
      case "\x15": // Ctrl+U: what is before the cursor
        return this.#deleteTo(0);
      case "\x0b": // Ctrl+K: what is after the cursor
        return this.#deleteTo(this.#buffer.length);
      case "\x17": // Ctrl+W: the word before the cursor
        return this.#deleteTo(this.#wordBefore());
      case "\x03": // Ctrl+C
        this.#interrupt();
        return;
      case "\x04": // Ctrl+D: end of input on an empty line, else Delete
        if (this.#buffer === "") this.#endOnce();
        else this.#deleteTo(this.#graphemeAfter());
        return;
      case "\t":
        if (this.#alone && this.#completer !== null && this.#active?.echo) {
          return this.#complete(this.#completer);
        }
        return this.#insert(" ");
      default:
        if (code < 0x20 || (code >= 0x7f && code <= 0x9f)) return;
        this.#insert(char);
    }
  }

  #complete(complete: (before: string) => string | undefined): void {
    const before = this.#buffer.slice(0, this.#cursor);
    const done = complete(before);
    if (done === undefined || done === before) return;
    this.#edit(done + this.#buffer.slice(this.#cursor), done.length);
  }

  /** Alt (Meta) with `char`. */
  #alt(char: string): void {
    switch (char) {
      case "b":
        return this.#move(this.#wordBefore());
      case "f":
        return this.#move(this.#wordAfter());
      case "d":
        return this.#deleteTo(this.#wordAfter());
      case "\x7f":
      case "\b":
        return this.#deleteTo(this.#wordBefore());
    }
  }

  /** Where the word before the cursor starts (spaces before the cursor skipped). */
  #wordBefore(): number {
    return this.#buffer.slice(0, this.#cursor).replace(/\S*\s*$/, "").length;
  }

  /** Where the word after the cursor ends (spaces after the cursor skipped). */
  #wordAfter(): number {
    const rest = this.#buffer.slice(this.#cursor);
    return this.#cursor + (/^\s*\S*/.exec(rest)?.[0].length ?? 0);
  }

  /** A control sequence: `ESC [ params final` or `ESC O final`. */
  #sequence(params: string, final: string): void {
    // Ctrl or Alt with Left/Right (`1;5D`, `1;3C`): a word at a time.
    const word = /^1;[35]$/.test(params);
    if (final === "D") {
      return this.#move(word ? this.#wordBefore() : this.#graphemeBefore());
    }
    if (final === "C") {
      return this.#move(word ? this.#wordAfter() : this.#graphemeAfter());
    }
    if (final === "H" || (final === "~" && /^[17]$/.test(params))) {
      return this.#move(0);
    }
    if (final === "F" || (final === "~" && /^[48]$/.test(params))) {
      return this.#move(this.#buffer.length);
    }
    if (final === "~" && params === "3") {
      return this.#deleteTo(this.#graphemeAfter());
    }
    if (final === "A") return this.#recall(-1);
    if (final === "B") return this.#recall(1);
  }

  #insert(text: string): void {
    this.#edit(
      this.#buffer.slice(0, this.#cursor) + text +
        this.#buffer.slice(this.#cursor),
      this.#cursor + text.length,
    );
  }

  /** Deletes what lies between the cursor and `to` (either side of it). */
  #deleteTo(to: number): void {
    const from = Math.min(to, this.#cursor);
    this.#edit(
      this.#buffer.slice(0, from) +
        this.#buffer.slice(Math.max(to, this.#cursor)),
      from,
    );
  }

  /** Where the user-perceived character before the cursor starts. */
  #graphemeBefore(): number {
    const before = splitGraphemes(this.#buffer.slice(0, this.#cursor));
    return this.#cursor - (before.at(-1)?.length ?? 0);
  }

  /** Where the user-perceived character after the cursor ends. */
  #graphemeAfter(): number {
    const after = splitGraphemes(this.#buffer.slice(this.#cursor));
    return this.#cursor + (after[0]?.length ?? 0);
  }

  #move(cursor: number): void {
    // Hidden input (a password) keeps its cursor at the end: a stray arrow
    // must not put the rest of it in the middle.
    if (cursor === this.#cursor || !this.#active?.echo) return;
    this.#cursor = cursor;
    if (this.#active?.echo) this.#redraw();
  }

  /** Up (-1) and Down (1) through the lines entered before. */
  #recall(step: number): void {
    if (!this.#active?.echo || !this.#active.history) return;
    const at = Math.max(
      0,
      Math.min(this.#history.length, this.#historyAt + step),
    );
    if (at === this.#historyAt) return;
    if (this.#historyAt === this.#history.length) this.#draft = this.#buffer;
    this.#historyAt = at;
    const line = this.#history[at] ?? this.#draft;
    this.#edit(line, line.length);
  }

  #edit(buffer: string, cursor: number): void {
    if (buffer === this.#buffer && cursor === this.#cursor) return;
    this.#buffer = buffer;
    this.#cursor = cursor;
    if (this.#active?.echo) this.#redraw();
  }

  #enter(): void {
    const line = this.#buffer;
    this.#buffer = "";
    this.#cursor = 0;
    const active = this.#active;
    if (
      active?.echo && active.history && line !== "" &&
      line !== this.#history.at(-1)
    ) {
      this.#history.push(line);
      if (this.#history.length > MAX_HISTORY) this.#history.shift();
    }
    this.#historyAt = this.#history.length;
    this.#draft = "";
    if (this.#plain) {
      // Only a hidden line is typed in raw mode: the prompt is written.
      this.#write(this.#editorOutput, "\n");
    } else if (active !== null && !active.transient) {
      // The answer stays on screen, as in any shell prompt.
      this.#clear();
      this.#write(
        this.#editorOutput,
        `${active.prompt ?? ""}${active.echo ? line : ""}\n`,
      );
      this.#active = null;
      this.#draw();
    }
    this.#queue.push(line);
    this.#deliver();
  }

  #interrupt(): void {
    this.#buffer = "";
    this.#cursor = 0;
    this.#historyAt = this.#history.length;
    this.#draft = "";
    const waiter = this.#waiter;
    if (waiter === null) {
      this.#interruptPending = true;
      return;
    }
    this.#waiter = null;
    this.#clear();
    if (this.#active !== null && this.#raw && this.#plain) {
      this.#write(this.#editorOutput, "^C\n");
      this.#active = null;
    } else if (this.#active !== null && !this.#plain) {
      this.#write(this.#editorOutput, `${this.#active.prompt ?? ""}^C\n`);
      this.#active = null;
    }
    waiter.reject(new Interrupted());
  }

  #endOnce(): void {
    // A hidden line on a plain terminal: its prompt's line is ended here.
    if (this.#plain && this.#raw) this.#write(this.#editorOutput, "\n");
    this.#queue.push(null);
    this.#deliver();
  }

  #deliver(): void {
    const waiter = this.#waiter;
    if (waiter === null) return;
    if (this.#queue.length > 0) {
      this.#waiter = null;
      waiter.resolve(this.#queue.shift() ?? null);
    } else if (this.#eof) {
      this.#waiter = null;
      waiter.resolve(null);
    }
  }

  #finishRead(): void {
    this.#waiter = null;
    if (this.#active !== null) {
      this.#clear();
      this.#active = null;
      this.#draw();
    }
    this.#setRaw(false);
  }

  #setRaw(on: boolean): void {
    if (this.#terminal === null || this.#raw === on) return;
    try {
      this.#terminal.setRaw(on);
      this.#raw = on;
    } catch {
      // A terminal that went away cannot be restored; nothing else to do.
      this.#raw = false;
    }
  }

  #redraw(): void {
    this.#clear();
    this.#draw();
  }

  // The footer (pending lines, then prompt and input) sits at the bottom,
  // the cursor where it is in the input. Clearing goes back up to the
  // footer's first row, counted at the present width (see `#drawn`).
  #clear(): void {
    const drawn = this.#drawn;
    if (this.#terminal === null || this.#plain || drawn === null) return;
    const columns = this.#columns();
    let up = cursorAt(drawn.input, drawn.cursor, columns).row;
    for (const width of drawn.footer) {
      up += Math.max(1, Math.ceil(width / columns));
    }
    this.#write(this.#editorOutput, `\r${up > 0 ? `\x1b[${up}A` : ""}\x1b[J`);
    this.#drawn = null;
  }

  #draw(): void {
    if (this.#terminal === null || this.#plain || this.#closed) return;
    const columns = this.#columns();
    let text = "";
    const footer: number[] = [];
    const lines = this.#footer.length > MAX_FOOTER_ROWS
      ? [
        ...this.#footer.slice(0, MAX_FOOTER_ROWS - 1),
        `… and ${this.#footer.length - MAX_FOOTER_ROWS + 1} more`,
      ]
      : this.#footer;
    for (const line of lines) {
      const shown = truncateVisible(line, columns - 1);
      text += shown + "\n";
      footer.push(visibleLength(shown));
    }
    const active = this.#active;
    if (active === null) {
      if (text === "") return;
      this.#write(this.#editorOutput, text);
      this.#drawn = { footer, input: [], cursor: 0 };
      return;
    }
    const prompt = truncateVisible(active.prompt ?? "", columns - 1);
    const promptWidth = visibleLength(prompt);
    const { shown, cursor } = active.echo
      ? inputWindow(
        this.#buffer,
        this.#cursor,
        MAX_INPUT_ROWS * columns - promptWidth - 1,
      )
      : { shown: "", cursor: 0 };
    // Where each character lands: a wide one that does not fit in a row's
    // last column goes to the next row, as the terminal does.
    const promptChars = splitGraphemes(stripColors(prompt));
    const input = [...promptChars, ...splitGraphemes(shown)].map(displayWidth);
    const index = promptChars.length +
      splitGraphemes(shown.slice(0, cursor)).length;
    text += prompt + shown;
    const end = cursorAt(input, input.length, columns);
    const at = cursorAt(input, index, columns);
    if (index === input.length) {
      // At the very end of a full row the terminal waits in its last
      // column: a new line puts the cursor where the next character goes.
      if (end.pending) text += "\n";
    } else {
      // Written to the end, the terminal is on the last character's row.
      const up = (end.pending ? end.row - 1 : end.row) - at.row;
      text += `\r${up > 0 ? `\x1b[${up}A` : ""}${
        at.col > 0 ? `\x1b[${at.col}C` : ""
      }`;
    }
    this.#write(this.#editorOutput, text);
    this.#drawn = { footer, input, cursor: index };
  }

  #columns(): number {
    return Math.max(this.#safeColumns(), 10);
  }

  #safeColumns(): number {
    let columns = 0;
    try {
      columns = this.#terminal?.columns() ?? 0;
    } catch {
      // No size known (e.g. a pseudo-terminal nobody sized): assume 80.
    }
    return columns > 0 ? columns : 80;
  }

  #write(writer: SyncWriter, text: string): void {
    writeAllSync(writer, encoder.encode(text));
  }
}

/**
 * Where the cursor is on the rows of an input line whose characters have
 * these `widths`, once the first `index` are written: its row and column,
 * and whether it waits past a full row (the terminal's pending wrap; at the
 * end of the line the editor then writes a new line, which the row counts).
 */
function cursorAt(
  widths: number[],
  index: number,
  columns: number,
): { row: number; col: number; pending: boolean } {
  let row = 0;
  let col = 0;
  for (let i = 0; i < index; i++) {
    const width = widths[i]!;
    if (col + width > columns) {
      row++;
      col = 0;
    }
    col += width;
  }
  const next = widths[index];
  if (next === undefined) {
    // The end: a full row is left for the next one (see `#draw`).
    return col >= columns && index > 0
      ? { row: row + 1, col: 0, pending: true }
      : { row, col, pending: false };
  }
  // Before a character: where it will be drawn.
  return col + next > columns
    ? { row: row + 1, col: 0, pending: false }
    : { row, col, pending: false };
}

function stripColors(text: string): string {
  // deno-lint-ignore no-control-regex
  return text.replace(/\x1b\[[0-9;]*m/g, "");
}

/** Writes every byte, looping over partial writes. */
export function writeAllSync(writer: SyncWriter, bytes: Uint8Array): void {
  let offset = 0;
  while (offset < bytes.length) {
    offset += writer.writeSync(bytes.subarray(offset));
  }
}

/** Cuts `text` to `columns` terminal columns, keeping colour codes whole. */
export function truncateVisible(text: string, columns: number): string {
  if (visibleLength(text) <= columns) return text;
  let out = "";
  let shown = 0;
  // deno-lint-ignore no-control-regex
  for (const part of text.split(/(\x1b\[[0-9;]*m)/)) {
    if (part.startsWith("\x1b[")) {
      out += part;
      continue;
    }
    for (const g of splitGraphemes(part)) {
      const width = displayWidth(g);
      if (shown + width > columns - 1) break;
      out += g;
      shown += width;
    }
  }
  return out + "…\x1b[0m";
}

/**
 * The part of a long input line that fits in `columns`, around the cursor
 * (`…` where it is cut), and where the cursor is in it (a UTF-16 index).
 */
export function inputWindow(
  buffer: string,
  cursor: number,
  columns: number,
): { shown: string; cursor: number } {
  if (displayWidth(buffer) <= columns) {
    return { shown: buffer, cursor };
  }
  const before = splitGraphemes(buffer.slice(0, cursor));
  const after = splitGraphemes(buffer.slice(cursor));
  // Room for the two marks; what follows the cursor gets up to a quarter.
  let room = Math.max(1, columns - 2);
  const tail: string[] = [];
  let tailRoom = Math.floor(room / 4);
  for (const g of after) {
    const width = displayWidth(g);
    if (width > tailRoom) break;
    tail.push(g);
    tailRoom -= width;
    room -= width;
  }
  const head: string[] = [];
  for (let i = before.length - 1; i >= 0; i--) {
    const width = displayWidth(before[i]!);
    if (width > room) break;
    head.unshift(before[i]!);
    room -= width;
  }
  // Room the part before the cursor left (near the start of the line) goes
  // to what follows it.
  for (let i = tail.length; i < after.length; i++) {
    const width = displayWidth(after[i]!);
    if (width > room) break;
    tail.push(after[i]!);
    room -= width;
  }
  const cutBefore = head.length < before.length;
  const shownBefore = `${cutBefore ? "…" : ""}${head.join("")}`;
  const cutAfter = tail.length < after.length;
  return {
    shown: `${shownBefore}${tail.join("")}${cutAfter ? "…" : ""}`,
    cursor: shownBefore.length,
  };
}
