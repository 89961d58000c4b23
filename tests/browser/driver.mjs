// A headless browser that tests/test_browser.py steers one command at a time.
//
// The scenario lives in Python, where the server processes, redis-server and the Python
// client are, so this script only knows how to drive a page: it reads one JSON command per
// line on stdin and answers one JSON line on stdout ({"ok":true,"result":...} or
// {"ok":false,"error":"..."}). Browser console errors and uncaught page errors are kept and
// returned by the "problems" command, so the test can fail on them.
//
// Two engines, one command set:
// - chromium: Debian's chromium through playwright-core (CDP);
// - firefox: Debian's firefox-esr through puppeteer-core over WebDriver BiDi (playwright's
//   Firefox needs its own patched build; puppeteer drives a stock Firefox).
// Neither package downloads a browser: the binaries come from the system.
//
// Environment: WSFAN_BROWSER = chromium (default) or firefox; WSFAN_BROWSER_PATH = the
// binary (default /usr/bin/chromium or /usr/bin/firefox-esr; WSFAN_CHROMIUM is still read).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const engine = process.env.WSFAN_BROWSER || "chromium";
const executablePath =
  process.env.WSFAN_BROWSER_PATH ||
  (engine === "firefox" ? "/usr/bin/firefox-esr" : process.env.WSFAN_CHROMIUM || "/usr/bin/chromium");
const userDataDir = mkdtempSync(join(tmpdir(), `wsfan-${engine}-`));
const viewport = { width: 1180, height: 760 };
const chromiumArgs = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

// The few calls whose signatures differ between playwright and puppeteer; the rest is shared.
const playwrightPage = (page) => ({
  fill: (selector, value, timeout) => page.fill(selector, value, { timeout }),
  click: (selector, timeout) => page.click(selector, { timeout }),
  press: (selector, key, timeout) => page.press(selector, key, { timeout }),
  waitFor: (fn, arg, timeout) => page.waitForFunction(fn, arg, { timeout, polling: 50 }),
  waitSelector: (selector, timeout) => page.waitForSelector(selector, { timeout, state: "attached" }),
});

const puppeteerPage = (page) => ({
  fill: (selector, value, timeout) => page.locator(selector).setTimeout(timeout).fill(value),
  click: (selector, timeout) => page.locator(selector).setTimeout(timeout).click(),
  press: async (selector, key, timeout) => {
    await page.waitForSelector(selector, { timeout });
    await page.focus(selector);
    await page.keyboard.press(key);
  },
  waitFor: (fn, arg, timeout) => page.waitForFunction(fn, { timeout, polling: 50 }, arg),
  waitSelector: (selector, timeout) => page.waitForSelector(selector, { timeout }),
});

async function launch() {
  if (engine === "firefox") {
    const { default: puppeteer } = await import("puppeteer-core");
    const browser = await puppeteer.launch({
      browser: "firefox",
      executablePath,
      headless: true,
      userDataDir,
      defaultViewport: viewport,
      extraPrefsFirefox: { "network.http.http3.enable": false },
    });
    const page = (await browser.pages())[0] ?? (await browser.newPage());
    return { page, ops: puppeteerPage(page), close: () => browser.close(), version: await browser.version() };
  }
  const { chromium } = await import("playwright-core");
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: chromiumArgs,
    viewport,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  return {
    page,
    ops: playwrightPage(page),
    close: () => context.close(),
    version: context.browser()?.version() ?? null,
  };
}

const problems = [];
let session;
let page;
let ops;

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
      await ops.fill(c.selector, c.value, timeout);
      return null;
    case "click":
      await ops.click(c.selector, timeout);
      return null;
    case "press":
      await ops.press(c.selector, c.key, timeout);
      return null;
    case "wait":
      // a selector to appear in the DOM (e.g. '#status[data-state="connected"]')
      await ops.waitSelector(c.selector, timeout);
      return null;
    case "wait_text":
      await ops.waitFor(
        ([selector, text]) => (document.querySelector(selector)?.textContent ?? "").includes(text),
        [c.selector, c.text],
        timeout,
      );
      return null;
    case "wait_js":
      // a JS expression over the page to become truthy; returns its value
      return (await ops.waitFor(c.expr, undefined, timeout)).jsonValue();
    case "eval":
      return page.evaluate(c.expr);
    case "texts":
      return page.$$eval(c.selector, (els) => els.map((e) => e.textContent));
    case "screenshot":
      await page.screenshot({ path: c.path, fullPage: Boolean(c.fullPage) });
      return c.path;
    case "problems":
      return problems;
    case "reset":
      // between tests sharing this browser: leave the last page (its sockets close) and forget its problems
      await page.goto("about:blank", { timeout });
      problems.length = 0;
      return null;
    default:
      throw new Error(`unknown command ${c.cmd}`);
  }
}

async function main() {
  session = await launch();
  ({ page, ops } = session);
  page.on("pageerror", (err) => problems.push(`pageerror: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error") problems.push(`console.error: ${msg.text()}`);
  });
  reply({ ok: true, result: { ready: true, engine, version: session.version } });
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
  if (session) await session.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(code);
