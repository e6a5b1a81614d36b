/**
 * torch.randn on a seeded CPU generator, value for value: `torch.Generator("cpu")
 * .manual_seed(seed)` is an mt19937 seeded with the seed's low 32 bits; `normal_` on a
 * contiguous float32 tensor of at least 16 values fills it with uniforms, then turns each
 * block of 16 into normals by Box–Muller (the first 8 as u1, the next 8 as u2; a tail that is
 * not a whole block is redrawn as the last 16 values). Smaller tensors draw one double normal
 * per value (Box–Muller on two 53-bit uniforms, the sine cached for the next value).
 */

const N = 624;
const M = 397;
const MATRIX_A = 0x9908b0df;
const UPPER = 0x80000000;
const LOWER = 0x7fffffff;
/** Values per Box–Muller block of torch's vectorised float path. */
export const BLOCK = 16;
const HALF = BLOCK / 2;
const TWO_POW_24 = 2 ** 24;
const TWO_POW_53 = 2 ** 53;

/** The 32-bit Mersenne Twister, seeded as torch's `mt19937(seed)`. */
export class MT19937 {
  private readonly state = new Uint32Array(N);
  private index = N;

  constructor(seed: number) {
    this.state[0] = seed >>> 0;
    for (let i = 1; i < N; i++) {
      const prev = this.state[i - 1] ^ (this.state[i - 1] >>> 30);
      // 1812433253 * prev + i, modulo 2^32, without losing bits to floating point.
      this.state[i] = (Math.imul(1812433253, prev) + i) >>> 0;
    }
  }

  private twist(): void {
    const s = this.state;
    for (let i = 0; i < N; i++) {
      const y = (s[i] & UPPER) | (s[(i + 1) % N] & LOWER);
      s[i] = s[(i + M) % N] ^ (y >>> 1) ^ (y & 1 ? MATRIX_A : 0);
    }
    this.index = 0;
  }

  /** The next 32-bit output. */
  next(): number {
    if (this.index >= N) this.twist();
    let y = this.state[this.index++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }
}

/** torch's uniform_real_distribution<float>: 24 random bits over 2^24. */
function uniformFloat(rng: MT19937): number {
  return Math.fround((rng.next() & (TWO_POW_24 - 1)) / TWO_POW_24);
}

/** torch's uniform_real_distribution<double>: random64() (two draws, first high), 53 bits. */
function uniformDouble(rng: MT19937): number {
  const high = rng.next();
  const low = rng.next();
  // The low 53 bits of (high << 32 | low): 21 bits of `high`, all 32 of `low`.
  return ((high & 0x1fffff) * 2 ** 32 + low) / TWO_POW_53;
}

function fillBlock(data: Float32Array, start: number): void {
  for (let j = 0; j < HALF; j++) {
    const u1 = Math.fround(1 - data[start + j]);
    const u2 = data[start + j + HALF];
    const radius = Math.fround(Math.sqrt(Math.fround(-2 * Math.fround(Math.log(u1)))));
    const theta = Math.fround(2 * Math.PI * u2);
    data[start + j] = Math.fround(radius * Math.fround(Math.cos(theta)));
    data[start + j + HALF] = Math.fround(radius * Math.fround(Math.sin(theta)));
  }
}

/**
 * `torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))` as float32.
 *
 * Seeds are integers in 0..2^53; torch keeps the low 32 bits.
 */
export function torchRandn(n: number, seed: number): Float32Array {
  if (!Number.isSafeInteger(seed) || seed < 0) {
    throw new Error(`seed must be a non-negative integer, got ${seed}`);
  }
  const rng = new MT19937(seed % 2 ** 32);
  const data = new Float32Array(n);
  if (n < BLOCK) {
    let cached: number | null = null;
    for (let i = 0; i < n; i++) {
      if (cached !== null) {
        data[i] = cached;
        cached = null;
        continue;
      }
      const u1 = uniformDouble(rng);
      const u2 = uniformDouble(rng);
      const r = Math.sqrt(-2 * Math.log1p(-u2));
      const theta = 2 * Math.PI * u1;
      cached = r * Math.sin(theta);
      data[i] = r * Math.cos(theta);
    }
    return data;
  }
  for (let i = 0; i < n; i++) data[i] = uniformFloat(rng);
  for (let i = 0; i + BLOCK <= n; i += BLOCK) fillBlock(data, i);
  if (n % BLOCK !== 0) {
    const start = n - BLOCK;
    for (let i = 0; i < BLOCK; i++) data[start + i] = uniformFloat(rng);
    fillBlock(data, start);
  }
  return data;
}
