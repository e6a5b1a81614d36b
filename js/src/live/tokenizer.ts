/**
 * The embedded model's tokenizer, as the Python one (diffwidget/models/tokenizer.py, the
 * CLIPTokenizer it configures, and diffwidget/tracing/tokens.py's labelling): the caption
 * normaliser, CLIP's byte-level BPE over the manifest's merges, start/end tokens, padding,
 * and the unknown-word check of diffwidget/models/prompts.py.
 */
import type { TokenizerFacts } from "./manifest";

export type TokenKind = "start" | "word" | "end" | "pad";

export interface Tokenized {
  ids: number[];
  /** Readable token strings (CLIP's word-end marker removed). */
  strings: string[];
  kinds: TokenKind[];
}

// Lookarounds instead of \b: Rust's \b (tokenizers) is Unicode-aware, JavaScript's is not.
const WORD_CHAR = "[\\p{L}\\p{N}\\p{M}_]";

/** NFC, lower case, non-alphanumerics to spaces, spellings, runs of white space to one. */
export function normaliseRaw(text: string, spellings: Record<string, string>): string {
  let out = text.normalize("NFC").toLowerCase();
  out = out.replace(/[^\p{L}\p{N}\s]/gu, " ");
  for (const [from, to] of Object.entries(spellings)) {
    const pattern = new RegExp(`(?<!${WORD_CHAR})${escapeRegExp(from)}(?!${WORD_CHAR})`, "gu");
    out = out.replace(pattern, to);
  }
  return out.replace(/\s+/gu, " ");
}

/** The caption as the model reads it, words joined by single spaces. */
export function normaliseCaption(text: string, spellings: Record<string, string>): string {
  return normaliseRaw(text, spellings).trim().split(" ").filter(Boolean).join(" ");
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** GPT-2's reversible byte -> printable character table (tokenizers' ByteLevel). */
function byteTable(): string[] {
  const keep: number[] = [];
  for (let b = 33; b <= 126; b++) keep.push(b);
  for (let b = 161; b <= 172; b++) keep.push(b);
  for (let b = 174; b <= 255; b++) keep.push(b);
  const table: string[] = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    if (keep.includes(b)) table[b] = String.fromCodePoint(b);
    else table[b] = String.fromCodePoint(256 + extra++);
  }
  return table;
}

const BYTES = byteTable();
const ENCODER = new TextEncoder();

export class WordTokenizer {
  private readonly ranks = new Map<string, number>();
  private readonly byId = new Map<number, string>();
  private readonly known: Set<string>;

  constructor(readonly facts: TokenizerFacts) {
    facts.merges.forEach((merge, rank) => {
      this.ranks.set(merge, rank);
    });
    for (const [token, id] of Object.entries(facts.vocab)) this.byId.set(id, token);
    this.known = new Set(facts.known_words);
  }

  /** CLIP's merge loop on one pre-tokenized piece (byte-level characters). */
  private bpe(word: string): string[] {
    const chars = Array.from(word);
    const pieces = [...chars.slice(0, -1), chars[chars.length - 1] + this.facts.word_end];
    while (pieces.length > 1) {
      let best = -1;
      let bestRank = Number.POSITIVE_INFINITY;
      for (let i = 0; i < pieces.length - 1; i++) {
        const rank = this.ranks.get(`${pieces[i]} ${pieces[i + 1]}`);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          best = i;
        }
      }
      if (best < 0) break;
      pieces.splice(best, 2, pieces[best] + pieces[best + 1]);
    }
    return pieces;
  }

  /** Token ids of the caption's words (no start/end), before truncation. */
  wordIds(text: string): number[] {
    const normalised = normaliseRaw(text, this.facts.spellings);
    const ids: number[] = [];
    // After normalisation only letters, digits and spaces remain: letter runs, single digits.
    for (const match of normalised.matchAll(/\p{L}+|\p{N}/gu)) {
      const bytes = ENCODER.encode(match[0]);
      const word = Array.from(bytes, (b) => BYTES[b]).join("");
      for (const piece of this.bpe(word)) ids.push(this.facts.vocab[piece] ?? this.facts.unk_id);
    }
    return ids;
  }

  /** Tokenize as the pipeline does: start, words (truncated), end, padding to max_length. */
  encode(text: string): Tokenized {
    const { bos_id, eos_id, pad_id, max_length, word_end } = this.facts;
    const words = this.wordIds(text).slice(0, max_length - 2);
    const ids = [bos_id, ...words, eos_id];
    while (ids.length < max_length) ids.push(pad_id);
    const kinds: TokenKind[] = [];
    let seenEnd = false;
    ids.forEach((id, position) => {
      if (position === 0 && id === bos_id) kinds.push("start");
      else if (seenEnd) kinds.push("pad");
      else if (id === eos_id) {
        kinds.push("end");
        seenEnd = true;
      } else kinds.push("word");
    });
    const strings = ids.map((id) => {
      const token = this.byId.get(id) ?? "";
      return token.endsWith(word_end) && token !== word_end
        ? token.slice(0, -word_end.length)
        : token;
    });
    return { ids, strings, kinds };
  }

  /** Words of the caption outside the model's vocabulary, each once, in order. */
  unknownWords(text: string): string[] {
    const found: string[] = [];
    for (const word of normaliseCaption(text, this.facts.spellings).split(" ")) {
      if (word && !this.known.has(word) && !found.includes(word)) found.push(word);
    }
    return found;
  }

  /** The warning Python's check_prompt gives for this caption, or "" when there is none. */
  warning(text: string): string {
    const unknown = this.unknownWords(text);
    if (unknown.length > 0) {
      const words = unknown.map((w) => `'${w}'`).join(", ");
      return this.facts.unknown_words_template.replace("{words}", words);
    }
    const n = normaliseCaption(text, this.facts.spellings).split(" ").filter(Boolean).length;
    if (n > this.facts.max_words) {
      return this.facts.too_long_template.replace("{n}", String(n));
    }
    return "";
  }
}

/** Positions a trace keeps by default: every non-padding position and the first padding one. */
export function defaultSelection(kinds: TokenKind[]): number[] {
  const keep: number[] = [];
  let pad = false;
  kinds.forEach((kind, i) => {
    if (kind !== "pad") keep.push(i);
    else if (!pad) {
      keep.push(i);
      pad = true;
    }
  });
  return keep;
}
