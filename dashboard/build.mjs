// Builds the static page into dist/: one bundled script (the app and mqtt.js) and
// the files it needs. `npm ci && npm run build`; nothing is fetched at run time.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";

const out = "dist";
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  entryPoints: ["src/main.js"],
  bundle: true,
  minify: true,
  sourcemap: true,
  format: "iife",
  platform: "browser",
  target: ["es2020"],
  outfile: `${out}/app.js`,
  logLevel: "warning",
});
for (const name of ["index.html", "style.css", "config.js"]) {
  copyFileSync(`src/${name}`, `${out}/${name}`);
}
console.log(`dashboard built in ${out}/`);
