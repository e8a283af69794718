import assert from "node:assert/strict";
import { CLI_PERMISSIONS, REPO_ROOT } from "./_cli_helpers.ts";

async function run(
  command: string,
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const output = await new Deno.Command(command, {
    args,
    cwd: REPO_ROOT,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

async function tasks(): Promise<Record<string, string>> {
  const config: unknown = JSON.parse(
    await Deno.readTextFile(`${REPO_ROOT}deno.json`),
  );
  assert.ok(typeof config === "object" && config !== null);
  assert.ok("tasks" in config);
  const { tasks } = config;
  assert.ok(typeof tasks === "object" && tasks !== null);
  return Object.fromEntries(
    Object.entries(tasks).filter((e): e is [string, string] =>
      typeof e[1] === "string"
    ),
  );
}

Deno.test("deno task cli runs the client from source", async () => {
  const { code, stdout } = await run(Deno.execPath(), [
    "task",
    "cli",
    "--version",
  ]);
  assert.equal(code, 0);
  assert.equal(stdout.trim(), "chatroom 0.1.0");
  // `deno task cli -- ARGS` hands the `--` on to the client, which skips it.
  const dashed = await run(Deno.execPath(), ["task", "cli", "--", "--version"]);
  assert.equal(dashed.code, 0);
  assert.equal(dashed.stdout.trim(), "chatroom 0.1.0");
});

Deno.test("cli, compile and install use the same entry point with the client's minimal permissions", async () => {
  const all = await tasks();
  for (const name of ["cli", "compile", "install"]) {
    const task = all[name] ?? "";
    assert.ok(task.endsWith(" cli/main.ts"), `${name}: ${task}`);
    for (const permission of CLI_PERMISSIONS) {
      assert.ok(task.includes(` ${permission} `), `${name}: ${task}`);
    }
    assert.ok(!/--allow-(all|read|write|run|sys|ffi)|\s-A\s/.test(task), task);
  }
  assert.match(all.compile ?? "", /^deno compile .*--output chatroom /);
  assert.match(all.install ?? "", /^deno install --global .*--name chatroom /);
});

Deno.test("deno task install installs a working chatroom command", async () => {
  const root = await Deno.makeTempDir({ prefix: "chatroom_install_" });
  try {
    const bin = Deno.execPath().replace(/\/[^/]*$/, "");
    const env = {
      DENO_INSTALL_ROOT: root,
      PATH: `${bin}:${Deno.env.get("PATH") ?? ""}`,
    };
    const install = await run(Deno.execPath(), ["task", "install"], env);
    assert.equal(install.code, 0, install.stderr);
    const installed = await run(`${root}/bin/chatroom`, ["--version"], env);
    assert.equal(installed.code, 0, installed.stderr);
    assert.equal(installed.stdout.trim(), "chatroom 0.1.0");
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});
