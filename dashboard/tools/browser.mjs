// Headless Debian chromium driven by playwright-core, one JSON request per stdin
// line, one JSON reply per stdout line. The Python browser test sends the steps
// (open, wait, text, press, screenshot) while it runs daemons and faults itself.
//   {"id": 1, "op": "open", "url": "file:///…/index.html?broker=ws://…"}
//   {"id": 2, "op": "wait", "js": "document.querySelector(…) !== null", "timeout_ms": 5000}
//   {"id": 3, "op": "eval", "js": "…"}            -> {"id": 3, "ok": true, "result": …}
//   {"id": 4, "op": "press", "key": "Tab"}
//   {"id": 5, "op": "screenshot", "path": "shot.png"}
//   {"id": 6, "op": "close"}
import { createInterface } from "node:readline";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const profile = mkdtempSync(join(tmpdir(), "pbm-dashboard-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1400, height: 900 },
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = context.pages()[0] || (await context.newPage());
const consoleLines = [];
page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));

const ops = {
  open: async (r) => { await page.goto(r.url); return page.url(); },
  wait: async (r) => {
    const handle = await page.waitForFunction(r.js, undefined, { timeout: r.timeout_ms ?? 10000, polling: 50 });
    return await handle.jsonValue();
  },
  eval: async (r) => await page.evaluate(r.js),
  press: async (r) => { await page.keyboard.press(r.key); return await page.evaluate("document.activeElement?.getAttribute('aria-labelledby') || document.activeElement?.id || document.activeElement?.tagName"); },
  screenshot: async (r) => { await page.screenshot({ path: r.path, fullPage: true }); return r.path; },
  console: async () => consoleLines.splice(0),
};

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
out({ ready: true, version: context.browser()?.version() ?? null });
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const r = JSON.parse(line);
  if (r.op === "close") break;
  try {
    out({ id: r.id, ok: true, result: (await ops[r.op](r)) ?? null });
  } catch (err) {
    out({ id: r.id, ok: false, error: String(err?.message || err), console: consoleLines.slice(-20) });
  }
}
await context.close();
rmSync(profile, { recursive: true, force: true });
