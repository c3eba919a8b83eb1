// Causal attention over packed segments on fp32 or bf16 tensors, for CPUs, RoPE in place
// (rs_rope_inplace) and RMSNorm with its residual add (rs_rmsnorm), at the end: rewardserve's C++ kernels.
//
// Why by hand: torch's CPU flash-attention kernel computes the whole L x L square for causal
// sequences shorter than 512 tokens and half of the wasted blocks above that, and BLAS calls on
// these short products spent a fifth of their time packing operands (MKL on the 2-core AMD VM).
// This kernel visits only the keys a query block can see, skips every tile of 32 rows x 12 keys
// above the diagonal, and runs both products in register-blocked micro-kernels on the query block
// transposed once and, with AVX-512, each key block transposed once (the scores' micro-kernel then reads
// its keys at unit stride, with constant offsets: 1.10x in fp32 on the 2-core VM); values are read
// in place. Transposes go 16 x 16 in registers; the softmax skips its masks on the keys every row of
// a vector sees. bf16 is read in place too: with AVX512-BF16 both
// products run on bf16 pairs with fp32 sums (the probabilities rounded to bf16, as HF's bf16 attention
// rounds them); without it, bf16 is widened to fp32 as it is read and the output rounded once.
//
// Layout: q (T, Hq, D), k and v (T, Hk, D), out (T, Hq, D), each with its own row stride in
// elements (q, k, v are views of the fused qkv projection); heads are contiguous within a row.
// Segment s owns rows starts[s] .. starts[s] + lens[s] - 1. A whole sequence (prefix_lens[s] = 0)
// sits at positions 0 .. lens[s] - 1. A response of a shared prompt follows its prompt's
// prefix_lens[s] rows, which start at prefix_starts[s]: its keys are the prompt's rows and then its
// own, and its positions continue after the prompt. A token at position i sees positions j with
// j <= i and, when window > 0, i - window < j.
//
// Work item: one segment, one kv head, one block of BQ query positions. The G = Hq / Hk query
// heads that share the kv head are stacked into one (G * n) x D matrix, so GQA turns into taller
// products. Keys are visited in blocks of BK with the online softmax (running max and sum per row).
// Runs of items (see below) are sorted by cost and handed out through an atomic counter: the threads
// stay balanced whatever the mix of lengths. Each item depends only on its own segment's rows, and
// every score and output is summed in a fixed order (over D, then over the block's keys), so an
// item's numbers do not depend on the batch it rides in, on where tiles fall, or on the thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <immintrin.h>

namespace {

constexpr int64_t BQ = 64;   // query positions per item
constexpr int64_t BK = 512;  // keys per online-softmax step
#if defined(__AVX512F__)
constexpr int64_t W = 16;  // floats per vector register (32 of them)
constexpr int KT = 12;     // micro-tile: KT keys (or dims) x RV vectors of rows, 24 accumulators
#else
constexpr int64_t W = 8;   // AVX2: 16 registers
constexpr int KT = 6;
#endif
constexpr int RV = 2;
constexpr int64_t RT = RV * W;  // rows per tile
typedef float vec __attribute__((vector_size(W * 4)));
typedef float uvec __attribute__((vector_size(W * 4), aligned(4), may_alias));
typedef int32_t ivec __attribute__((vector_size(W * 4)));
typedef int32_t uivec __attribute__((vector_size(W * 4), aligned(4), may_alias));

inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
inline void store(float* p, vec x) { *reinterpret_cast<uvec*>(p) = x; }
inline ivec iload(const int32_t* p) { return *reinterpret_cast<const uivec*>(p); }
// x in every lane, loaded straight into the broadcast (`vec{} + x` would first add 0.0f to x: -0.0)
inline vec splat(const float* x) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(*x);
#else
  return _mm256_broadcast_ss(x);
#endif
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// The micro-kernel of both products, on tiles of XX columns by NR vectors of rows:
//   c[x][r] (+)= sum over t = t0 .. t1-1, in order, of b[x * bx + t * bt] a[t][r]
// with a and c of row stride rp. Scores: t runs over D, a = Q^T, b = the keys (x a key), c = S^T.
// Outputs: t runs over the block's keys, a = P^T, b = the values (x a dim), c = O^T, accumulated.
template <int XX, int NR, bool UNIT>
inline void tile_s(const float* a, int64_t rp, const float* b, int64_t bx, int64_t bt, int64_t t0, int64_t t1,
                   float* c, bool accumulate) {
  if constexpr (UNIT) bx = 1;  // the columns' offsets are then constants
  vec acc[XX][NR];
  for (int x = 0; x < XX; ++x)
    for (int v = 0; v < NR; ++v) acc[x][v] = accumulate ? load(c + x * rp + v * W) : vec{};
  for (int64_t t = t0; t < t1; ++t) {
    vec av[NR];
    for (int v = 0; v < NR; ++v) av[v] = load(a + t * rp + v * W);
    for (int x = 0; x < XX; ++x) {
      const vec bv = splat(b + x * bx + t * bt);
      for (int v = 0; v < NR; ++v) acc[x][v] += bv * av[v];
    }
  }
  for (int x = 0; x < XX; ++x)
    for (int v = 0; v < NR; ++v) store(c + x * rp + v * W, acc[x][v]);
}

template <int XX, int NR>
inline void tile(const float* a, int64_t rp, const float* b, int64_t bx, int64_t bt, int64_t t0, int64_t t1,
                 float* c, bool accumulate) {
  if (bx == 1) return tile_s<XX, NR, true>(a, rp, b, bx, bt, t0, t1, c, accumulate);
  tile_s<XX, NR, false>(a, rp, b, bx, bt, t0, t1, c, accumulate);
}

template <int XX, int NR>
struct F32 {
  template <class... A>
  static void run(A... args) { tile<XX, NR>(args...); }
};

#if defined(__AVX512BF16__)
constexpr bool kDotBf16 = true;

// `tile` on bf16 pairs, for bf16 models where the CPU has AVX512-BF16: a and b hold two bf16 values
// per 32-bit unit (t runs over pairs), and each instruction multiplies 32 pairs of bf16 (exact in
// fp32) and adds them to 16 fp32 accumulators: twice the fp32 rate. The result is scaled once.
template <int XX, int NR, bool UNIT>
inline void tile_bf16_s(const uint32_t* a, int64_t rp, const uint32_t* b, int64_t bx, int64_t bt, int64_t t0,
                        int64_t t1, float* c, bool accumulate, float scale) {
  if constexpr (UNIT) bx = 1;
  __m512 acc[XX][NR];
  for (int x = 0; x < XX; ++x)
    for (int v = 0; v < NR; ++v) acc[x][v] = accumulate ? _mm512_loadu_ps(c + x * rp + v * W) : _mm512_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    __m512bh av[NR];
    for (int v = 0; v < NR; ++v) av[v] = (__m512bh)_mm512_loadu_si512(a + t * rp + v * W);
    for (int x = 0; x < XX; ++x) {
      const __m512bh bv = (__m512bh)_mm512_set1_epi32(static_cast<int>(b[x * bx + t * bt]));
      for (int v = 0; v < NR; ++v) acc[x][v] = _mm512_dpbf16_ps(acc[x][v], av[v], bv);
    }
  }
  for (int x = 0; x < XX; ++x)
    for (int v = 0; v < NR; ++v) _mm512_storeu_ps(c + x * rp + v * W, _mm512_mul_ps(acc[x][v], _mm512_set1_ps(scale)));
}

template <int XX, int NR>
inline void tile_bf16(const uint32_t* a, int64_t rp, const uint32_t* b, int64_t bx, int64_t bt, int64_t t0,
                      int64_t t1, float* c, bool accumulate, float scale) {
  if (bx == 1) return tile_bf16_s<XX, NR, true>(a, rp, b, bx, bt, t0, t1, c, accumulate, scale);
  tile_bf16_s<XX, NR, false>(a, rp, b, bx, bt, t0, t1, c, accumulate, scale);
}

template <int XX, int NR>
struct Bf16 {
  template <class... A>
  static void run(A... args) { tile_bf16<XX, NR>(args...); }
};

// Rows' probabilities for keys c and c + 1, rounded to bf16 (nearest even) and interleaved: the pair
// unit of row r holds (P[c][r], P[c + 1][r]).
inline void store_pairs(uint32_t* dst, vec e0, vec e1) {
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);  // e0's 16 bf16, then e1's
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(idx, both));
}
#else  // never called: Args::dot is false without AVX512-BF16
constexpr bool kDotBf16 = false;
template <int XX, int NR>
struct Bf16 {
  template <class... A>
  static void run(A...) {}
};
inline void store_pairs(uint32_t*, vec, vec) {}
#endif

// A tile of xx <= KT columns and nr = 1 or RV vectors of rows: the edge tiles are other sizes.
template <template <int, int> class T, int NR, int XX, class... A>
inline void tile_n(int xx, A... args) {
  if constexpr (XX >= 1) {
    if (xx == XX) return T<XX, NR>::run(args...);
    return tile_n<T, NR, XX - 1>(xx, args...);
  }
}

template <template <int, int> class T, class... A>
inline void product(int xx, int nr, A... args) {
  if (nr == RV) return tile_n<T, RV, KT>(xx, args...);
  return tile_n<T, 1, KT>(xx, args...);
}

// exp(x) for x <= 0 (softmax after subtracting the row max), lane by lane: Cody-Waite reduction
// x = n ln2 + r (n rounded to an integer by adding and subtracting 1.5 * 2^23, exact for |n| < 2^22),
// a degree-6 polynomial for e^r, 2^n put into the exponent bits. Relative error below 2e-7; below
// -87 it returns about 1.6e-38 instead of 0, which only ever multiplies zeros.
__attribute__((always_inline)) inline vec exp_nonpositive(vec x) {
  x = x < -87.0f ? vec{} - 87.0f : x;
  const vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vec r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  vec p = vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return (vec)((ivec)p + (__builtin_convertvector(n, ivec) << 23));
}


#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr bool kTranspose16 = true;

// 16 vectors of 16 lanes transposed in registers: r[i] lane c -> r[c] lane i (bits moved, not changed).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
    r[4 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xDD);
  }
}

inline __mmask16 first(int64_t m) { return static_cast<__mmask16>((1u << m) - 1); }  // m <= 16

// Q^T for one query head: qt[c * rp + i] = scale * q row i, column c (i < n, c < d), 16 x 16 at a
// time. 32-bit units: fp32 values, or the bf16 pairs of the AVX512-BF16 path (scale 1, d in pairs).
inline void transpose_in(const char* src, int64_t ld_bytes, int64_t n, int64_t d, float* qt, int64_t rp,
                         bool scaled, float scale) {
  __m512 r[16];
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - i0);
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      const int64_t wc = std::min<int64_t>(16, d - c0);
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < m ? _mm512_maskz_loadu_ps(first(wc), src + (i0 + i) * ld_bytes + c0 * 4) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t c = 0; c < wc; ++c)
        _mm512_mask_storeu_ps(qt + (c0 + c) * rp + i0, first(m), scaled ? _mm512_mul_ps(r[c], _mm512_set1_ps(scale)) : r[c]);
    }
  }
}

// The inverse for one query head's output: out row i, column c = ot[c * rp + i] / sum[i], each value
// computed as the scalar loop does (inv = 1 / sum, then one product), stored fp32 or rounded to bf16.
inline void transpose_out(const float* ot, const float* sum, int64_t rp, int64_t n, int64_t d, void* out,
                          int64_t ldo, bool bf16) {
  __m512 r[16];
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - i0);
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), first(m), sum + i0));
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      const int64_t wc = std::min<int64_t>(16, d - c0);
      for (int64_t c = 0; c < 16; ++c)
        r[c] = c < wc ? _mm512_mul_ps(_mm512_maskz_loadu_ps(first(m), ot + (c0 + c) * rp + i0), inv) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t i = 0; i < m; ++i) {
        if (!bf16) {
          _mm512_mask_storeu_ps(static_cast<float*>(out) + (i0 + i) * ldo + c0, first(wc), r[i]);
          continue;
        }
        const __m512i bits = _mm512_castps_si512(r[i]);  // f32_to_bf16, lane by lane
        __m512i h = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)),
                                                       _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1))), 16);
        h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(r[i], r[i], _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + (i0 + i) * ldo + c0, first(wc), _mm512_cvtepi32_epi16(h));
      }
    }
  }
}
#else
constexpr bool kTranspose16 = false;
inline void transpose_in(const char*, int64_t, int64_t, int64_t, float*, int64_t, bool, float) {}
inline void transpose_out(const float*, const float*, int64_t, int64_t, int64_t, void*, int64_t, bool) {}
#endif

struct Item {
  // kv head, own query rows r0..r1-1 (rows of the segment), first visible key position k0, and the
  // row of q and out that holds query row r0 (the packed row, or the selection's index)
  int64_t seg, head, r0, r1, k0, qrow;
};

struct Args {
  const void *q, *k, *v;
  void* out;
  bool bf16;
  int64_t ldq, ldk, ldv, ldo, g, d, window;
  float scale;
  const int64_t *starts, *prefix_starts, *prefix_lens;
  bool dot;  // bf16 products on bf16 pairs (AVX512-BF16, even D and strides)
};

// Whether q and k are transposed 16 x 16 in registers: with AVX-512, for fp32 and for bf16 pairs (the
// widening path keeps its scalar loops).
inline bool in_blocks16(const Args& a) { return kTranspose16 && (a.dot || !a.bf16); }

// An uninitialised buffer: every value is written before it is read (zeroing the whole scratch of
// every call cost more than the attention of a batch of short sequences).
template <class T>
struct Buf {
  std::unique_ptr<T[]> p;
  size_t n = 0;
  void resize(size_t m) {
    p.reset(new T[m]);
    n = m;
  }
  T* data() const { return p.get(); }
  bool empty() const { return n == 0; }
  T& operator[](size_t i) const { return p[i]; }
};

// Scratch of one thread, for up to `rows` stacked query rows, rp = rows rounded up to whole vectors:
// the output accumulator transposed (D x rp), one block of scores transposed (BK x rp), per row the
// running max and sum and the block's visible keys; and, by path, the query block transposed (D x rp)
// with the block's keys and values as fp32 rows when they are bf16 or straddle a prompt's end (BK x D
// each), or (bf16 pairs) Q^T, P^T and V with their pairs along D, keys and keys; with AVX-512, a key
// block transposed (D x BK).
struct Scratch {
  Buf<float> ot, st, max, sum, qt, kb, vb, kt;
  Buf<int32_t> lo, hi;
  Buf<uint32_t> qt2, pt2, vp2;
  Scratch(const Args& a, int64_t rows) {
    const int64_t rp = (rows + W - 1) / W * W;
    ot.resize(a.d * rp);
    st.resize(BK * rp);
    for (Buf<float>* b : {&max, &sum}) b->resize(rp);
    for (Buf<int32_t>* b : {&lo, &hi}) b->resize(rp);
    if (in_blocks16(a)) kt.resize(a.d * BK);  // K^T of a block (fp32 or bf16 pairs)
    if (a.dot) {
      qt2.resize(a.d / 2 * rp);
      pt2.resize(BK / 2 * rp);
      vp2.resize(BK / 2 * a.d);
      return;
    }
    qt.resize(a.d * rp);
    if (a.bf16) widen(a);
  }
  // A block's keys and values as fp32 rows: always for bf16 widened, else on the first block that
  // straddles a prompt's end (allocated then: most calls never need them).
  void widen(const Args& a) {
    kb.resize(BK * a.d);
    vb.resize(BK * a.d);
  }
};

// Packed row of the key at position c of segment `seg`.
inline int64_t key_row(const Args& a, int64_t seg, int64_t c) {
  const int64_t p = a.prefix_lens[seg];
  return c < p ? a.prefix_starts[seg] + c : a.starts[seg] + c - p;
}

// Keys (or values) c = from .. n - 1 of a block of head h of a fp32 or bf16 tensor, as fp32 rows: key c
// is packed row r + c when c < np (a prompt's), else r2 + c - np (the segment's own). Returns the row of
// key 0 and the row stride: in place for fp32 rows of one run, else copied into scratch.
inline const float* rows_f32(const void* base, bool bf16, int64_t ld, int64_t r, int64_t np, int64_t r2,
                             int64_t from, int64_t n, int64_t col, int64_t d, float* scratch, int64_t& ld_out) {
  if (!bf16 && (np == 0 || np >= n)) {
    ld_out = ld;
    return static_cast<const float*>(base) + r * ld + col;
  }
  for (int64_t c = from; c < n; ++c) {
    const int64_t row = c < np ? r + c : r2 + c - np;
    for (int64_t i = 0; i < d; ++i)
      scratch[c * d + i] = bf16 ? bf16_to_f32(static_cast<const uint16_t*>(base)[row * ld + col + i])
                                : static_cast<const float*>(base)[row * ld + col + i];
  }
  ld_out = d;
  return scratch;
}

void run_item(const Args& a, const Item& w, Scratch& t) {
  // rp: the row stride of this item's transposed buffers, its rows rounded up to whole vectors
  const int64_t n = w.r1 - w.r0, rows = a.g * n, d = a.d, rp = (rows + W - 1) / W * W;
  const int64_t plen = a.prefix_lens[w.seg], end = plen + w.r1;  // keys at positions k0 .. end-1
  float *qt = t.qt.data(), *ot = t.ot.data(), *st = t.st.data();
  if (a.dot)  // rows past `rows` stay 0: their scores are computed, and never seen
    std::fill_n(t.qt2.data(), d / 2 * rp, 0u);
  else
    std::fill_n(qt, d * rp, 0.0f);
  const bool blocks16 = in_blocks16(a);
  for (int64_t j = 0; j < a.g && blocks16; ++j) {  // in 16 x 16 blocks
    const int64_t esize = a.bf16 ? 2 : 4, col = (w.head * a.g + j) * d;
    const char* src = static_cast<const char*>(a.q) + (w.qrow * a.ldq + col) * esize;
    transpose_in(src, a.ldq * esize, n, a.dot ? d / 2 : d, a.dot ? reinterpret_cast<float*>(t.qt2.data()) + j * n : qt + j * n,
                 rp, !a.dot, a.scale);
  }
  for (int64_t j = 0; j < a.g && !blocks16; ++j)  // row j * n + i: query head head * g + j, position r0 + i
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = j * n + i, col = (w.head * a.g + j) * d, at = (w.qrow + i) * a.ldq + col;
      if (a.dot) {  // bf16 pairs as they are; the scale goes on the scores
        const uint16_t* src = static_cast<const uint16_t*>(a.q) + at;
        for (int64_t c = 0; c < d; c += 2) t.qt2[c / 2 * rp + row] = src[c] | static_cast<uint32_t>(src[c + 1]) << 16;
        continue;
      }
      for (int64_t c = 0; c < d; ++c) {
        const float x = a.bf16 ? bf16_to_f32(static_cast<const uint16_t*>(a.q)[at + c])
                               : static_cast<const float*>(a.q)[at + c];
        qt[c * rp + row] = x * a.scale;
      }
    }
  std::fill_n(ot, d * rp, 0.0f);
  std::fill_n(t.max.data(), rp, -INFINITY);
  std::fill_n(t.sum.data(), rp, 0.0f);
  // Key blocks sit at whole multiples of BK positions, wherever the item's first visible key and
  // the prompt's end fall: a row's online softmax then steps through the same blocks whether its
  // sequence runs whole or as a prompt and a response, so both give the same bits.
  for (int64_t c0 = w.k0 / BK * BK, nk; c0 < end; c0 += nk) {
    nk = std::min(BK, end - c0);
    const int64_t from = std::max<int64_t>(w.k0 - c0, 0);  // no row of the item sees the block's keys before it
    const int64_t np = std::min(std::max<int64_t>(plen - c0, 0), nk);  // the block's prompt keys come first
    const int64_t r = key_row(a, w.seg, c0), r2 = a.starts[w.seg] + std::max<int64_t>(c0 - plen, 0);
    int64_t ldk = 0, ldv = 0;
    const float *kp = nullptr, *vp = nullptr;
    if (blocks16) {  // keys transposed: the scores' micro-kernel reads them at unit stride
      const int64_t esize = a.bf16 ? 2 : 4, units = a.dot ? d / 2 : d, own = std::max(from, np);
      const char* kbase = static_cast<const char*>(a.k) + w.head * d * esize;
      if (np > from)
        transpose_in(kbase + (r + from) * a.ldk * esize, a.ldk * esize, np - from, units, t.kt.data() + from, BK,
                     false, 1.0f);
      if (nk > own)
        transpose_in(kbase + (r2 + own - np) * a.ldk * esize, a.ldk * esize, nk - own, units, t.kt.data() + own, BK,
                     false, 1.0f);
    }
    if (a.dot) {
      const uint16_t* v16 = static_cast<const uint16_t*>(a.v) + w.head * d;
      auto row_of = [&](int64_t c) { return c < np ? r + c : r2 + c - np; };
      for (int64_t c = from & ~int64_t{1}; c < nk; c += 2) {  // values as pairs of consecutive keys (0 past the block)
        const uint16_t *v0 = v16 + row_of(c) * a.ldv, *v1 = c + 1 < nk ? v16 + row_of(c + 1) * a.ldv : nullptr;
        for (int64_t j = 0; j < d; ++j)
          t.vp2[c / 2 * d + j] = v0[j] | (v1 ? static_cast<uint32_t>(v1[j]) << 16 : 0u);
      }
    } else {
      if (t.vb.empty() && np > 0 && np < nk) t.widen(a);
      if (!blocks16)
        kp = rows_f32(a.k, a.bf16, a.ldk, r, np, r2, from, nk, w.head * d, d, t.kb.data(), ldk);
      vp = rows_f32(a.v, a.bf16, a.ldv, r, np, r2, from, nk, w.head * d, d, t.vb.data(), ldv);
    }
    // what the scores read: dim (or pair) u of key x at keys[x * kx + u * ku], transposed or in place
    const float* keys = blocks16 ? t.kt.data() : kp;
    const uint32_t* keys2 = reinterpret_cast<const uint32_t*>(t.kt.data());  // bf16 pairs: always transposed
    const int64_t kx = blocks16 ? 1 : ldk, ku = blocks16 ? BK : 1;
    for (int64_t row = 0; row < rp; ++row) {  // the keys of this block each row sees: [lo, hi)
      if (row >= rows) {  // padding: sees nothing, and keeps its tile off the keys before `from` (not loaded)
        t.lo[row] = t.hi[row] = static_cast<int32_t>(from);
        continue;
      }
      const int64_t p = plen + w.r0 + row % n;
      // a window can start past this block's end (the block starts at a multiple of BK, not at k0)
      const int64_t lo = std::min(std::max<int64_t>(a.window > 0 ? p - a.window + 1 - c0 : 0, 0), nk);
      t.lo[row] = static_cast<int32_t>(lo);
      t.hi[row] = static_cast<int32_t>(std::max<int64_t>(std::min(nk, p - c0 + 1), lo));
    }
    for (int64_t r0 = 0; r0 < rp; r0 += RT) {  // one tile of rows at a time, over the keys it sees
      const int64_t nr = std::min<int64_t>(RT, rp - r0);
      const int64_t lo = *std::min_element(&t.lo[r0], &t.lo[r0] + nr);
      const int64_t hi = *std::max_element(&t.hi[r0], &t.hi[r0] + nr);  // the tile sees keys lo .. hi-1
      if (hi <= lo) continue;
      for (int64_t c = lo; c < hi; c += KT) {  // scores
        const int kk = static_cast<int>(std::min<int64_t>(KT, hi - c)), nv = static_cast<int>(nr / W);
        if (a.dot)
          product<Bf16>(kk, nv, t.qt2.data() + r0, rp, keys2 + c * kx, kx, ku, int64_t{0}, d / 2, st + c * rp + r0,
                        false, a.scale);
        else
          product<F32>(kk, nv, qt + r0, rp, keys + c * kx, kx, ku, int64_t{0}, d, st + c * rp + r0, false);
      }
      for (int64_t x0 = r0; x0 < r0 + nr; x0 += W) {  // online softmax, W rows at a time
        const ivec rlo = iload(&t.lo[x0]), rhi = iload(&t.hi[x0]);
        // keys [ilo, ihi) are seen by all W rows: no masks there
        const int64_t ilo = std::max<int64_t>(lo, *std::max_element(&t.lo[x0], &t.lo[x0] + W));
        const int64_t ihi = std::max<int64_t>(ilo, *std::min_element(&t.hi[x0], &t.hi[x0] + W));
        vec bmax = vec{} - INFINITY;  // the block's max of each row, over the keys it sees
        auto masked_max = [&](int64_t c) __attribute__((always_inline)) {
          const ivec cv = ivec{} + static_cast<int32_t>(c);
          const vec sc = load(st + c * rp + x0);
          bmax = ((cv >= rlo) & (cv < rhi) & (sc > bmax)) ? sc : bmax;
        };
        for (int64_t c = lo; c < ilo; ++c) masked_max(c);
        for (int64_t c = ilo; c < ihi; ++c) {
          const vec sc = load(st + c * rp + x0);
          bmax = sc > bmax ? sc : bmax;
        }
        for (int64_t c = ihi; c < hi; ++c) masked_max(c);
        const vec old = load(&t.max[x0]);
        const vec mx = bmax > old ? bmax : old;
        const vec alpha = mx == -INFINITY ? vec{} + 1.0f : exp_nonpositive(old - mx);  // rescale what came before
        store(&t.max[x0], mx);
        for (int64_t j = 0; j < d; ++j) store(ot + j * rp + x0, load(ot + j * rp + x0) * alpha);
        vec sum = load(&t.sum[x0]) * alpha;
        auto prob = [&](int64_t c) __attribute__((always_inline)) {  // probabilities, 0 where a row cannot see the key
          const ivec cv = ivec{} + static_cast<int32_t>(c);
          const vec e = ((cv >= rlo) & (cv < rhi)) ? exp_nonpositive(load(st + c * rp + x0) - mx) : vec{};
          sum += e;
          return e;
        };
        auto prob_all = [&](int64_t c) __attribute__((always_inline)) {  // a key every row sees
          const vec e = exp_nonpositive(load(st + c * rp + x0) - mx);
          sum += e;
          return e;
        };
        if (a.dot) {
          for (int64_t c = lo & ~int64_t{1}; c < hi; c += 2)
            if (c >= ilo && c + 2 <= ihi)
              store_pairs(t.pt2.data() + c / 2 * rp + x0, prob_all(c), prob_all(c + 1));
            else
              store_pairs(t.pt2.data() + c / 2 * rp + x0, prob(c), prob(c + 1));
        } else {
          for (int64_t c = lo; c < ilo; ++c) store(st + c * rp + x0, prob(c));
          for (int64_t c = ilo; c < ihi; ++c) store(st + c * rp + x0, prob_all(c));
          for (int64_t c = ihi; c < hi; ++c) store(st + c * rp + x0, prob(c));
        }
        store(&t.sum[x0], sum);
      }
      const int64_t parts = (d + KT - 1) / KT;  // outputs, D cut into near-equal tiles (64 = 4 x 11 + 2 x 10)
      for (int64_t part = 0, j = 0; part < parts; ++part) {
        const int64_t jj = d / parts + (part < d % parts);
        if (a.dot)
          product<Bf16>(static_cast<int>(jj), static_cast<int>(nr / W), t.pt2.data() + r0, rp, t.vp2.data() + j,
                        int64_t{1}, d, lo / 2, (hi + 1) / 2, ot + j * rp + r0, true, 1.0f);
        else
          product<F32>(static_cast<int>(jj), static_cast<int>(nr / W), st + r0, rp, vp + j, int64_t{1}, ldv, lo, hi,
                       ot + j * rp + r0, true);
        j += jj;
      }
    }
  }
  for (int64_t j = 0; j < a.g && kTranspose16; ++j) {
    const int64_t at_out = w.qrow * a.ldo + (w.head * a.g + j) * d;
    void* dst = a.bf16 ? static_cast<void*>(static_cast<uint16_t*>(a.out) + at_out)
                       : static_cast<void*>(static_cast<float*>(a.out) + at_out);
    transpose_out(ot + j * n, t.sum.data() + j * n, rp, n, d, dst, a.ldo, a.bf16);
  }
  for (int64_t j = 0; j < a.g && !kTranspose16; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = j * n + i;
      const float inv = 1.0f / t.sum[row];
      const int64_t at_out = (w.qrow + i) * a.ldo + (w.head * a.g + j) * d;
      for (int64_t c = 0; c < d; ++c) {
        const float x = ot[c * rp + row] * inv;
        if (a.bf16)
          static_cast<uint16_t*>(a.out)[at_out + c] = f32_to_bf16(x);
        else
          static_cast<float*>(a.out)[at_out + c] = x;
      }
    }
}

}  // namespace

// Returns 0, or 1 when the shapes are inconsistent (the Python wrapper checks them first).
// nsel = 0: every row of every segment; q and out are packed like k and v.
// nsel > 0: only row sel_row[i] of segment sel_seg[i], for i < nsel; q and out then hold one row per
// selection, in that order (a reward model's last layer needs only its pooled rows' outputs).
extern "C" int rs_causal_attention(const void* q, const void* k, const void* v, void* out, int64_t bf16,
                                       int64_t ldq, int64_t ldk, int64_t ldv, int64_t ldo,
                                       int64_t hq, int64_t hk, int64_t d, const int64_t* starts,
                                       const int64_t* lens, const int64_t* prefix_starts,
                                       const int64_t* prefix_lens, int64_t nseg, const int64_t* sel_seg,
                                       const int64_t* sel_row, int64_t nsel, int64_t window,
                                       float scale, int64_t threads) {
  if (hk <= 0 || hq % hk != 0 || d <= 0 || threads <= 0) return 1;
  const bool dot = kDotBf16 && kTranspose16 && bf16 && d % 2 == 0 && ldk % 2 == 0 && ldv % 2 == 0 &&
                   reinterpret_cast<uintptr_t>(k) % 4 == 0 && reinterpret_cast<uintptr_t>(v) % 4 == 0;
  const Args a{q, k, v, out, bf16 != 0, ldq, ldk, ldv, ldo, hq / hk, d, window, scale, starts,
               prefix_starts, prefix_lens, dot};
  auto first_key = [&](int64_t s, int64_t r0) {  // position of the first key row r0 of s can see
    const int64_t first = prefix_lens[s] + r0;
    return window > 0 ? std::max<int64_t>(first - window + 1, 0) : int64_t{0};
  };
  std::vector<Item> items;  // ordered by segment, kv head, then query rows
  for (int64_t i = 0; i < nsel; ++i) {
    const int64_t s = sel_seg[i], r = sel_row[i];
    if (s < 0 || s >= nseg || r < 0 || r >= lens[s]) return 1;
    for (int64_t h = 0; h < hk; ++h) items.push_back({s, h, r, r + 1, first_key(s, r), i});
  }
  if (nsel > 0)
    std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) {
      return x.seg != y.seg ? x.seg < y.seg : x.head != y.head ? x.head < y.head : x.r0 < y.r0;
    });
  for (int64_t s = 0; s < nseg && nsel == 0; ++s)
    for (int64_t h = 0; h < hk; ++h)
      for (int64_t r0 = 0; r0 < lens[s]; r0 += BQ)
        items.push_back({s, h, r0, std::min(lens[s], r0 + BQ), first_key(s, r0), starts[s] + r0});
  // A thread takes a run of consecutive items of one segment and head, so the keys and values the
  // first item fetched are still in its cache for the next (they were read from DRAM once per item
  // when items went out one by one); runs are short enough to leave 8 per thread to balance.
  auto cost = [&](const Item& x) { return prefix_lens[x.seg] + x.r1 - x.k0; };
  int64_t total = 0;
  for (const Item& x : items) total += cost(x);
  const int64_t budget = std::max<int64_t>(1, total / (8 * threads));
  struct Run {
    size_t begin, end;
    int64_t cost;
  };
  std::vector<Run> runs;
  for (size_t i = 0; i < items.size(); ++i) {
    const bool same = !runs.empty() && items[i].seg == items[runs.back().begin].seg &&
                      items[i].head == items[runs.back().begin].head && runs.back().cost < budget;
    if (!same) runs.push_back({i, i, 0});
    runs.back().end = i + 1;
    runs.back().cost += cost(items[i]);
  }
  std::stable_sort(runs.begin(), runs.end(), [](const Run& x, const Run& y) { return x.cost > y.cost; });
  std::atomic<size_t> next(0);
#pragma omp parallel num_threads(threads)
  {
    Scratch scratch(a, a.g * BQ);
    for (size_t i = next.fetch_add(1); i < runs.size(); i = next.fetch_add(1))
      for (size_t j = runs[i].begin; j < runs[i].end; ++j) run_item(a, items[j], scratch);
  }
  return 0;
}

// Rotary embedding in place on q (T, Hq, D) and k (T, Hk, D), fp32 or bf16, row strides ldq and ldk,
// with per-token tables cos and sin (T, D) fp32 whose two halves are equal (rope_tables builds them
// so): x1, x2 = the halves of a head; x1 <- x1 c - x2 s, x2 <- x2 c + x1 s. Bit-identical to
// kernels/rope.py's rope_cpu (and so to HF): every product and sum rounded on its own (no fused
// multiply-add, hence fp-contract off), in bf16 each rounded to bf16 as torch's bf16 ops do, with
// the tables rounded to bf16 first. One pass over q and k, where torch's ops take eight and allocate.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
namespace {
template <bool BF16>
void rope_rows(void* x, int64_t ld, int64_t heads, int64_t d, const float* cos, const float* sin, int64_t ldc,
               int64_t t) {
  const int64_t half = d / 2;
  const float* c = cos + t * ldc;
  const float* s = sin + t * ldc;
  for (int64_t h = 0; h < heads; ++h) {
    if constexpr (BF16) {
      uint16_t* p = static_cast<uint16_t*>(x) + t * ld + h * d;
      for (int64_t i = 0; i < half; ++i) {
        const float cb = bf16_to_f32(f32_to_bf16(c[i])), sb = bf16_to_f32(f32_to_bf16(s[i]));
        const float x1 = bf16_to_f32(p[i]), x2 = bf16_to_f32(p[i + half]);
        const float a = bf16_to_f32(f32_to_bf16(x1 * cb)), b = bf16_to_f32(f32_to_bf16(x2 * sb));
        const float e = bf16_to_f32(f32_to_bf16(x2 * cb)), f = bf16_to_f32(f32_to_bf16(x1 * sb));
        p[i] = f32_to_bf16(a - b);
        p[i + half] = f32_to_bf16(e + f);
      }
    } else {
      float* p = static_cast<float*>(x) + t * ld + h * d;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = p[i], x2 = p[i + half];
        const float a = x1 * c[i], b = x2 * s[i], e = x2 * c[i], f = x1 * s[i];
        p[i] = a - b;
        p[i + half] = e + f;
      }
    }
  }
}
}  // namespace

extern "C" int rs_rope_inplace(void* q, void* k, int64_t bf16, int64_t T, int64_t hq, int64_t hk, int64_t d,
                               int64_t ldq, int64_t ldk, const float* cos, const float* sin, int64_t ldc,
                               int64_t threads) {
  if (d % 2 != 0 || threads <= 0) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    if (bf16) {
      rope_rows<true>(q, ldq, hq, d, cos, sin, ldc, t);
      rope_rows<true>(k, ldk, hk, d, cos, sin, ldc, t);
    } else {
      rope_rows<false>(q, ldq, hq, d, cos, sin, ldc, t);
      rope_rows<false>(k, ldk, hk, d, cos, sin, ldc, t);
    }
  }
  return 0;
}
#pragma GCC pop_options

// RMSNorm of rows of x (T, H), fp32 or bf16 with a weight of the same dtype, with the residual add
// fused in when `residual` is given: stream = x + residual (written to `stream`, one rounding), out =
// weight * (stream / sqrt(mean(stream^2) + eps)). The reference's roundings in order (kernels/rmsnorm.py's
// rmsnorm_cpu): in bf16, the normalised value is rounded to bf16 before the weight product, which
// is rounded again; in fp32, x * r and then * weight, each rounded. Only the sum of squares is
// summed in another order than torch's (16 partial sums, then in order). One pass to sum and one to
// write, per row, where torch's CPU rms_norm takes five passes and allocates four temporaries.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
namespace {
template <bool BF16>
struct Elt {
  using T = typename std::conditional<BF16, uint16_t, float>::type;
  static float get(T v) {
    if constexpr (BF16) return bf16_to_f32(v); else return v;
  }
  static T put(float x) {
    if constexpr (BF16) return f32_to_bf16(x); else return x;
  }
  static float round(float x) {
    if constexpr (BF16) return bf16_to_f32(f32_to_bf16(x)); else return x;
  }
};

template <bool BF16>
void rmsnorm_row(const void* xv, const void* rv, const void* wv, void* ov, void* sv, int64_t H, float eps) {
  using E = Elt<BF16>;
  using T = typename E::T;
  const T* x = static_cast<const T*>(xv);
  const T* w = static_cast<const T*>(wv);
  T* out = static_cast<T*>(ov);
  if (rv != nullptr) {  // the stream, one rounding of the exact sum
    const T* r = static_cast<const T*>(rv);
    T* s = static_cast<T*>(sv);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) s[i] = E::put(E::get(x[i]) + E::get(r[i]));
    x = s;
  }
  constexpr int P = 16;  // partial sums of squares, lane i over columns i, i + 16, ...
  float part[P] = {};
  int64_t i = 0;
  for (; i + P <= H; i += P)
#pragma omp simd
    for (int j = 0; j < P; ++j) part[j] += E::get(x[i + j]) * E::get(x[i + j]);
  for (int j = 0; i + j < H; ++j) part[j] += E::get(x[i + j]) * E::get(x[i + j]);
  float sum = 0.0f;
  for (int j = 0; j < P; ++j) sum += part[j];
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) out[k] = E::put(E::round(E::get(x[k]) * r) * E::get(w[k]));
}
}  // namespace

extern "C" int rs_rmsnorm(const void* x, const void* residual, const void* weight, void* out, void* stream,
                          int64_t bf16, int64_t T, int64_t H, int64_t ldx, int64_t ldr, int64_t ldo, int64_t lds,
                          float eps, int64_t threads) {
  if (H <= 0 || threads <= 0) return 1;
  const int64_t es = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static) if (T * H >= 16384)
  for (int64_t t = 0; t < T; ++t) {
    const char* xr = static_cast<const char*>(x) + t * ldx * es;
    const char* rr = residual ? static_cast<const char*>(residual) + t * ldr * es : nullptr;
    char* sr = stream ? static_cast<char*>(stream) + t * lds * es : nullptr;
    char* orow = static_cast<char*>(out) + t * ldo * es;
    if (bf16)
      rmsnorm_row<true>(xr, rr, weight, orow, sr, H, eps);
    else
      rmsnorm_row<false>(xr, rr, weight, orow, sr, H, eps);
  }
  return 0;
}
#pragma GCC pop_options
