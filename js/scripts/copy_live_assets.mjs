// Copy what the live bundle needs beside it: onnxruntime-web's single-thread SIMD
// WebAssembly binary (the page hands it to onnxruntime, which then fetches nothing), its
// licence and third-party notices, and the bundled version (read by the Python side).
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";

const here = new URL("../", import.meta.url);
const dist = new URL("node_modules/onnxruntime-web/dist/", here);
const out = new URL("../diffwidget/widget/static/", here);
const version = JSON.parse(
  readFileSync(new URL("node_modules/onnxruntime-web/package.json", here), "utf8"),
).version;
mkdirSync(new URL("licenses/onnxruntime-web/", out), { recursive: true });
copyFileSync(new URL("ort-wasm-simd-threaded.wasm", dist), new URL("ort-wasm-simd-threaded.wasm", out));
for (const name of ["LICENSE", "ThirdPartyNotices.txt"]) {
  copyFileSync(new URL(`licenses/onnxruntime-web/${name}`, here), new URL(`licenses/onnxruntime-web/${name}`, out));
}
writeFileSync(new URL("live_runtime.json", out), `${JSON.stringify({ onnxruntime_web: version })}\n`);
