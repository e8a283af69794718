/**
 * The one line reader over stdin that the menu, the password prompt and the
 * chat share, so that piped input is never lost between them (a reader per
 * question drops what the previous one had buffered).
 *
 * From a pipe it splits lines and queues them until asked. On a terminal it is
 * a small line editor in raw mode: it echoes (or, for passwords, hides) what is
 * typed, and {@linkcode LineReader.print} writes a line *above* the prompt and
 * the line being typed, then redraws them, so arriving messages never garble
 * the input. Raw mode is on only while a line is being read and is restored in
 * `finally`, also when Ctrl+C ends the read.
 *
 * @module
 */
import { Interrupted } from "./cli_error.ts";
import { visibleLength } from "./render.ts";

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
  /** Shown before the input on a terminal (never into a pipe). */
  prompt?: string;
  /** Whether typed characters are shown (false for passwords). */
  echo?: boolean;
  /** Whether the typed line disappears once entered (chat redraws it itself). */
  transient?: boolean;
  /** Ends the wait early; the read then rejects with the signal's reason. */
  signal?: AbortSignal;
}

const encoder = new TextEncoder();

/** One shared line reader over stdin; see the module documentation. */
export class LineReader {
  #input: ReadableStream<Uint8Array>;
  #output: SyncWriter;
  #terminal: TerminalControl | null;
  #editorOutput: SyncWriter;
  #editorShares: boolean;

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
  #active: ReadLineOptions | null = null;
  #footer: string[] = [];
  #drawnRowsAbove = -1;
  #escape: "" | "esc" | "csi" = "";
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
  }

  /** Whether a person types at a terminal (prompts shown, input edited here). */
  get interactive(): boolean {
    return this.#terminal !== null;
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
    if (this.#queue.length > 0) {
      return Promise.resolve(this.#queue.shift() ?? null);
    }
    if (this.#eof) return Promise.resolve(null);
    const { signal } = options;
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<string | null>((resolve, reject) => {
      const onAbort = () => {
        this.#buffer = "";
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
      if (this.#terminal !== null) {
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
  print(line: string): void {
    if (this.#terminal !== null && this.#editorShares) {
      this.#clear();
      this.#write(this.#output, line + "\n");
      this.#draw();
    } else {
      this.#write(this.#output, line + "\n");
    }
  }

  /**
   * Lines kept just above the prompt on a terminal until replaced (the
   * user's messages waiting for their echo); ignored when not interactive.
   */
  setFooter(lines: string[]): void {
    if (this.#terminal === null) return;
    this.#clear();
    this.#footer = [...lines];
    this.#draw();
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
    if (this.#terminal === null) {
      const parts = (this.#partial + text).split("\n");
      this.#partial = parts.pop() ?? "";
      for (const part of parts) {
        this.#queue.push(part.endsWith("\r") ? part.slice(0, -1) : part);
      }
      this.#deliver();
      return;
    }
    for (const char of text) this.#key(char);
  }

  #key(char: string): void {
    const code = char.codePointAt(0) ?? 0;
    // Escape sequences (arrows, function keys) are skipped whole.
    if (this.#escape === "esc") {
      this.#escape = char === "[" || char === "O" ? "csi" : "";
      return;
    }
    if (this.#escape === "csi") {
      if (code >= 0x40 && code <= 0x7e) this.#escape = "";
      return;
    }
    const wasCr = this.#lastWasCr;
    this.#lastWasCr = char === "\r";
    switch (char) {
      case "\x1b":
        this.#escape = "esc";
        return;
      case "\r":
        this.#enter();
        return;
      case "\n":
        if (!wasCr) this.#enter();
        return;
      case "\x7f":
      case "\b": {
        const chars = [...this.#buffer];
        chars.pop();
        this.#edit(chars.join(""));
        return;
      }
      case "\x15": // Ctrl+U
        this.#edit("");
        return;
      case "\x17": // Ctrl+W
        this.#edit(this.#buffer.replace(/\S*\s*$/, ""));
        return;
      case "\x03": // Ctrl+C
        this.#interrupt();
        return;
      case "\x04": // Ctrl+D
        if (this.#buffer === "") this.#endOnce();
        return;
      default:
        if (code < 0x20 || (code >= 0x7f && code <= 0x9f)) return;
        this.#edit(this.#buffer + char);
    }
  }

  #edit(buffer: string): void {
    if (buffer === this.#buffer) return;
    this.#buffer = buffer;
    if (this.#active?.echo) this.#redraw();
  }

  #enter(): void {
    const line = this.#buffer;
    this.#buffer = "";
    const active = this.#active;
    if (active !== null && !active.transient) {
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
    const waiter = this.#waiter;
    if (waiter === null) {
      this.#interruptPending = true;
      return;
    }
    this.#waiter = null;
    this.#clear();
    if (this.#active !== null) {
      this.#write(this.#editorOutput, `${this.#active.prompt ?? ""}^C\n`);
      this.#active = null;
    }
    waiter.reject(new Interrupted());
  }

  #endOnce(): void {
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

  // The footer (pending lines, then prompt and input) sits at the bottom;
  // the cursor stays at the end of the input. #drawnRowsAbove counts the rows
  // above the cursor that belong to it, -1 when nothing is drawn.
  #clear(): void {
    if (this.#terminal === null || this.#drawnRowsAbove < 0) return;
    const up = this.#drawnRowsAbove > 0 ? `\x1b[${this.#drawnRowsAbove}A` : "";
    this.#write(this.#editorOutput, `\r${up}\x1b[J`);
    this.#drawnRowsAbove = -1;
  }

  #draw(): void {
    if (this.#terminal === null || this.#closed) return;
    const columns = Math.max(this.#safeColumns(), 10);
    let text = "";
    let rows = 0;
    for (const line of this.#footer) {
      text += truncateVisible(line, columns - 1) + "\n";
      rows++;
    }
    const active = this.#active;
    if (active !== null) {
      const line = `${active.prompt ?? ""}${active.echo ? this.#buffer : ""}`;
      text += line;
      const width = visibleLength(line);
      rows += width > 0 ? Math.floor((width - 1) / columns) : 0;
    } else if (text === "") {
      return;
    }
    this.#write(this.#editorOutput, text);
    this.#drawnRowsAbove = rows;
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

/** Writes every byte, looping over partial writes. */
export function writeAllSync(writer: SyncWriter, bytes: Uint8Array): void {
  let offset = 0;
  while (offset < bytes.length) {
    offset += writer.writeSync(bytes.subarray(offset));
  }
}

/** Cuts `text` to `columns` visible characters, keeping colour codes whole. */
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
    for (const char of part) {
      if (shown >= columns - 1) break;
      out += char;
      shown++;
    }
  }
  return out + "…\x1b[0m";
}
