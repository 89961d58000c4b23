// A headless Chromium that tests/test_browser.py steers one command at a time.
//
// The scenario lives in Python, where the server processes, redis-server and the Python
// client are, so this script only knows how to drive a page: it reads one JSON command per
// line on stdin and answers one JSON line on stdout ({"ok":true,"result":...} or
// {"ok":false,"error":"..."}). Browser console errors and uncaught page errors are kept and
// returned by the "problems" command, so the test can fail on them.
//
// Environment: WSFAN_CHROMIUM = the browser binary (default /usr/bin/chromium).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

import { chromium } from "playwright-core";

const executablePath = process.env.WSFAN_CHROMIUM || "/usr/bin/chromium";
const userDataDir = mkdtempSync(join(tmpdir(), "wsfan-chromium-"));
const args = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const problems = [];
let context;
let page;

function reply(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

async function run(c) {
  const timeout = c.timeout ?? 10000;
  switch (c.cmd) {
    case "goto": {
      await page.goto(c.url, { waitUntil: "load", timeout });
      return page.url();
    }
    case "fill":
      await page.fill(c.selector, c.value, { timeout });
      return null;
    case "click":
      await page.click(c.selector, { timeout });
      return null;
    case "press":
      await page.press(c.selector, c.key, { timeout });
      return null;
    case "wait":
      // a selector to appear (e.g. '#status[data-state="connected"]')
      await page.waitForSelector(c.selector, { timeout, state: c.state ?? "attached" });
      return null;
    case "wait_text":
      await page.waitForFunction(
        ([selector, text]) => (document.querySelector(selector)?.textContent ?? "").includes(text),
        [c.selector, c.text],
        { timeout, polling: 50 },
      );
      return null;
    case "wait_js":
      // a JS expression over the page to become truthy; returns its value
      return (await page.waitForFunction(c.expr, null, { timeout, polling: 50 })).jsonValue();
    case "eval":
      return page.evaluate(c.expr);
    case "texts":
      return page.$$eval(c.selector, (els) => els.map((e) => e.textContent));
    case "screenshot":
      await page.screenshot({ path: c.path, fullPage: Boolean(c.fullPage) });
      return c.path;
    case "problems":
      return problems;
    default:
      throw new Error(`unknown command ${c.cmd}`);
  }
}

async function main() {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args,
    viewport: { width: 1180, height: 760 },
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (err) => problems.push(`pageerror: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error") problems.push(`console.error: ${msg.text()}`);
  });
  reply({ ok: true, result: { ready: true, version: context.browser()?.version() ?? null } });
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let command;
    try {
      command = JSON.parse(line);
    } catch (err) {
      reply({ ok: false, error: `bad command: ${err.message}` });
      continue;
    }
    if (command.cmd === "quit") break;
    try {
      reply({ ok: true, result: (await run(command)) ?? null });
    } catch (err) {
      reply({ ok: false, error: String(err && err.message ? err.message : err) });
    }
  }
}

let code = 0;
try {
  await main();
} catch (err) {
  reply({ ok: false, error: `driver failed: ${err && err.stack ? err.stack : err}` });
  code = 1;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(code);
