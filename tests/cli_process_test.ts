import assert from "node:assert/strict";
import {
  CLI_PERMISSIONS,
  CliProcess,
  loginProcess,
  looksLikeStackTrace,
  PASSWORD,
  register,
  REPO_ROOT,
  startServers,
} from "./_cli_helpers.ts";

/** A local port where nothing listens. */
function closedPort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr;
  listener.close();
  return port;
}

Deno.test("--version prints the version and exits 0", async () => {
  const cli = new CliProcess(["--version"]);
  assert.equal(await cli.exit(), 0);
  assert.deepEqual(cli.stdout.lines, ["chatroom 0.1.0"]);
  assert.equal(cli.stderr.text, "");
});

Deno.test("--help prints the usage on stdout and exits 0", async () => {
  const cli = new CliProcess(["--help"]);
  assert.equal(await cli.exit(), 0);
  const text = cli.stdout.text;
  for (
    const part of [
      "chatroom register",
      "chatroom login",
      "--auth-url",
      "--user",
      "--password-stdin",
      "--version",
    ]
  ) {
    assert.ok(text.includes(part), `usage mentions ${part}:\n${text}`);
  }
});

Deno.test("an unknown flag prints the usage on stderr and exits 2", async (t) => {
  for (
    const args of [["--bogus"], ["login", "--frobnicate"], ["logout"], [
      "--auth-url",
      "ftp://example.com",
    ]]
  ) {
    await t.step(args.join(" "), async () => {
      const cli = new CliProcess(args);
      assert.equal(await cli.exit(), 2);
      assert.match(cli.stderr.lines[0] ?? "", /^chatroom: /);
      assert.ok(cli.stderr.text.includes("Usage:"), cli.stderr.text);
      assert.equal(cli.stdout.text, "");
      assert.ok(!looksLikeStackTrace(cli.stderr.text), cli.stderr.text);
    });
  }
});

Deno.test("with the auth server down, login and register say so in one line and exit 1", async (t) => {
  const authUrl = `http://127.0.0.1:${closedPort()}`;
  const expected =
    `chatroom: cannot reach the auth server at ${authUrl} (connection refused)`;

  await t.step("login --password-stdin", async () => {
    const cli = loginProcess(authUrl, "alice");
    await cli.write("secretpw1");
    assert.equal(await cli.exit(), 1);
    assert.deepEqual(cli.stderr.lines, [expected]);
    assert.ok(!looksLikeStackTrace(cli.stderr.text));
  });

  await t.step(
    "register, with the address from CHATROOM_AUTH_URL",
    async () => {
      const cli = new CliProcess(["register", "--user", "alice"], {
        CHATROOM_AUTH_URL: authUrl,
      });
      await cli.write("secretpw1");
      assert.equal(await cli.exit(), 1);
      assert.deepEqual(cli.stderr.lines, [expected]);
      assert.ok(!looksLikeStackTrace(cli.stderr.text));
    },
  );
});

Deno.test("with the auth server down, the menu shows one line, comes back, and exits 0 at end of input", async () => {
  const authUrl = `http://127.0.0.1:${closedPort()}`;
  const cli = new CliProcess(["--auth-url", authUrl]);
  await cli.write("1", "alice", "secretpw1");
  await cli.closeStdin();
  assert.equal(await cli.exit(), 0);
  assert.deepEqual(cli.stderr.lines, [
    `chatroom: cannot reach the auth server at ${authUrl} (connection refused)`,
  ]);
  assert.ok(!looksLikeStackTrace(cli.stderr.text));
  assert.equal(cli.stdout.count((l) => l === "1) login"), 2, cli.stdout.text);
  assert.equal(cli.stdout.count((l) => l === "2) register"), 2);
});

Deno.test("end of input at the menu exits 0", async () => {
  const cli = new CliProcess([
    "--auth-url",
    `http://127.0.0.1:${closedPort()}`,
  ]);
  await cli.closeStdin();
  assert.equal(await cli.exit(), 0);
  assert.ok(cli.stdout.text.includes("1) login"));
  assert.equal(cli.stderr.text, "");
});

Deno.test("end of input at a prompt reached from the menu exits 0; in a subcommand it is a failure", async (t) => {
  const authUrl = `http://127.0.0.1:${closedPort()}`;
  const cases = [
    { name: "at the username prompt", input: ["1"] },
    { name: "at the password prompt", input: ["2", "alice"] },
  ];
  for (const { name, input } of cases) {
    await t.step(`menu, ${name}`, async () => {
      const cli = new CliProcess(["--auth-url", authUrl]);
      await cli.write(...input);
      await cli.closeStdin();
      assert.equal(await cli.exit(), 0);
      assert.equal(cli.stderr.text, "");
    });
  }
  await t.step("chatroom login, at the password prompt", async () => {
    const cli = new CliProcess([
      "login",
      "--auth-url",
      authUrl,
      "--user",
      "al",
    ]);
    await cli.closeStdin();
    assert.equal(await cli.exit(), 1);
    assert.deepEqual(cli.stderr.lines, [
      "chatroom: no password given: the input ended",
    ]);
  });
  await t.step("chatroom register, at the username prompt", async () => {
    const cli = new CliProcess(["register", "--auth-url", authUrl]);
    await cli.closeStdin();
    assert.equal(await cli.exit(), 1);
    assert.deepEqual(cli.stderr.lines, [
      "chatroom: no username given: the input ended",
    ]);
  });
});

Deno.test("when whatever reads the output goes away, the client ends with one line, not an unexpected error", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        ...CLI_PERMISSIONS,
        "cli/main.ts",
        "login",
        "--auth-url",
        servers.authUrl,
        "--user",
        "alice",
        "--password-stdin",
      ],
      cwd: REPO_ROOT,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    const stdin = child.stdin.getWriter();
    await stdin.write(new TextEncoder().encode(`${PASSWORD}\n`));
    const out = child.stdout.getReader();
    let seen = "";
    while (!seen.includes("connected as alice")) {
      const { value, done } = await out.read();
      if (done) throw new Error(`output ended: ${seen}`);
      seen += new TextDecoder().decode(value);
    }
    await out.cancel();
    // Output from now on has nowhere to go.
    await stdin.write(new TextEncoder().encode("/help\n"));
    const [status, stderr] = await Promise.all([
      child.status,
      new Response(child.stderr).text(),
    ]);
    await stdin.close().catch(() => {});
    assert.equal(status.code, 1);
    assert.equal(
      stderr.trim().split("\n").pop(),
      "chatroom: the output was closed",
    );
  } finally {
    await servers.close();
  }
});
