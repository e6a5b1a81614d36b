/**
 * Where the live assets come from: embedded in the page as base64 (the single offline file,
 * which works from file://), or fetched from the page's own folder (a static web host).
 * Nothing else is ever requested.
 */
import type { FirstRunPayload } from "./first";
import type { GraphName, LiveManifest } from "./manifest";
import { checkManifest, modelGraphs } from "./manifest";
import type { PageFacts } from "./payloads";
import type { LiveAssets } from "./runtime";

/** File name of onnxruntime-web's single-thread SIMD WebAssembly binary. */
export const WASM_FILE = "ort-wasm-simd-threaded.wasm";

export interface AssetSource {
  /** The bytes of one asset file (a graph, or the .wasm binary). */
  bytes(file: string): Promise<Uint8Array>;
}

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const LOOKUP = new Uint8Array(256).fill(255);
for (let i = 0; i < ALPHABET.length; i++) LOOKUP[ALPHABET.charCodeAt(i)] = i;

/** Decode base64 text (white space ignored) without building a string per byte. */
export function decodeBase64(text: string): Uint8Array {
  const clean = text.replace(/[^A-Za-z0-9+/]/g, "");
  const out = new Uint8Array(Math.floor((clean.length * 3) / 4));
  let o = 0;
  let i = 0;
  for (; i + 4 <= clean.length; i += 4) {
    const n =
      (LOOKUP[clean.charCodeAt(i)] << 18) |
      (LOOKUP[clean.charCodeAt(i + 1)] << 12) |
      (LOOKUP[clean.charCodeAt(i + 2)] << 6) |
      LOOKUP[clean.charCodeAt(i + 3)];
    out[o++] = n >> 16;
    out[o++] = (n >> 8) & 255;
    out[o++] = n & 255;
  }
  const rest = clean.length - i;
  if (rest >= 2) {
    const n = (LOOKUP[clean.charCodeAt(i)] << 18) | (LOOKUP[clean.charCodeAt(i + 1)] << 12);
    out[o++] = n >> 16;
    if (rest === 3) out[o++] = ((n | (LOOKUP[clean.charCodeAt(i + 2)] << 6)) >> 8) & 255;
  }
  return out.subarray(0, o);
}

/** Inflate gzip bytes with the browser's own DecompressionStream. */
export async function gunzip(bytes: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([bytes as BlobPart])
    .stream()
    .pipeThrough(new DecompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Assets in `<script type="application/octet-stream" data-file="...">` elements. */
export function embeddedSource(doc: Document = document): AssetSource {
  return {
    async bytes(file: string): Promise<Uint8Array> {
      for (const node of doc.querySelectorAll<HTMLScriptElement>("script[data-file]")) {
        if (node.dataset.file !== file) continue;
        const bytes = decodeBase64(node.textContent ?? "");
        return node.dataset.encoding === "gzip" ? gunzip(bytes) : bytes;
      }
      throw new Error(`the page holds no ${file}; export it again with diffwidget export --live`);
    },
  };
}

/** Assets next to the page (`base` is a folder URL ending in "/"). */
export function folderSource(base: string): AssetSource {
  return {
    async bytes(file: string): Promise<Uint8Array> {
      const response = await fetch(new URL(file, base));
      if (!response.ok) throw new Error(`could not load ${file} (HTTP ${response.status})`);
      return new Uint8Array(await response.arrayBuffer());
    },
  };
}

/** SHA-256 of bytes as hex (checked against the manifest before a session is made). */
async function sha256(bytes: Uint8Array): Promise<string | null> {
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) return null; // file:// pages are not a secure context in every browser
  const digest = new Uint8Array(await subtle.digest("SHA-256", bytes as BufferSource));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The name a model's graph file has in the page (widget/live.py `asset_files`). */
export function assetName(manifest: LiveManifest, file: string): string {
  return `${manifest.model}/${file}`;
}

/**
 * Load and check every asset the models need, in order. Bytes an earlier model already
 * loaded (same SHA-256 in its manifest: the DiT shares the UNet's decoders) are reused and
 * not asked for again, as the page ships them once.
 */
export async function loadAssets(
  source: AssetSource,
  manifestData: unknown[],
): Promise<LiveAssets[]> {
  const manifests: LiveManifest[] = manifestData.map(checkManifest);
  const loaded = new Map<string, Uint8Array>();
  const wasm = await source.bytes(WASM_FILE);
  const buffer = wasm.buffer.slice(wasm.byteOffset, wasm.byteOffset + wasm.byteLength);
  const out: LiveAssets[] = [];
  for (const manifest of manifests) {
    const graphs: Partial<Record<GraphName, Uint8Array>> = {};
    for (const name of modelGraphs(manifest.model)) {
      const graph = manifest.graphs.find((g) => g.name === name);
      if (!graph) throw new Error(`the manifest has no ${name} graph`);
      const known = loaded.get(graph.sha256);
      const bytes = known ?? (await source.bytes(assetName(manifest, graph.file)));
      const digest = known ? graph.sha256 : await sha256(bytes);
      if (bytes.length !== graph.bytes || (digest !== null && digest !== graph.sha256)) {
        throw new Error(`${graph.file} is damaged (size or SHA-256 differs from the manifest)`);
      }
      loaded.set(graph.sha256, bytes);
      graphs[name] = bytes;
    }
    out.push({ manifest, graphs, wasm: buffer as ArrayBuffer });
  }
  return out;
}

/** One model of the page (widget/live.py LiveModelConfig). */
export interface ModelConfig {
  manifest: unknown;
  facts: PageFacts;
  /** Heading of the model's panels when the page shows several models. */
  label: string;
}

/** What the Python side embeds beside the assets. */
export interface PageConfig {
  /** The models, in the order their panels are shown. */
  models: ModelConfig[];
  /** Caption shown (and generated) first. */
  prompt: string;
  /** A second caption for the side-by-side comparison ("" = off). */
  compare: string;
  /** onnxruntime-web version bundled (for the licence line). */
  onnxruntime_web: string;
  /** Per model, the first caption generated ahead (none: generated once the page loads). */
  first: FirstRunPayload[];
}

/** The smallest valid WebAssembly module (magic and version). */
const EMPTY_MODULE = Uint8Array.of(0, 97, 115, 109, 1, 0, 0, 0);

/** Why WebAssembly cannot run here ("" when it can): missing, or forbidden by the page's CSP. */
export function wasmProblem(): string {
  if (typeof WebAssembly !== "object") {
    return "this browser has no WebAssembly, so captions cannot be generated in the page";
  }
  try {
    new WebAssembly.Module(EMPTY_MODULE);
    return "";
  } catch (error) {
    return (
      "this page's Content-Security-Policy does not allow WebAssembly ('wasm-unsafe-eval'), " +
      `so captions cannot be generated in the browser (${String(error).slice(0, 120)})`
    );
  }
}
