// Causal attention over packed segments, fp32, for CPUs: rewardserve's one C++ kernel.
//
// Why by hand: torch's CPU flash-attention kernel computes the whole L x L square for causal
// sequences shorter than 512 tokens and half of the wasted blocks above that (measured on the
// 2-core VM: causal costs the same as non-causal up to L = 512), so it runs at 45-90 GFLOP/s
// of useful work on the mixed 32..1024-token batches training jobs send. This kernel visits only
// the keys a query block can see (the diagonal block is the only one masked) and calls the BLAS
// torch already carries (`sgemm_`, exported by libtorch_cpu) for the two products.
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
// GEMMs. Keys are visited in blocks of BK with the online softmax (running max and sum per row).
// Items are sorted by cost and handed out through an atomic counter: the threads stay balanced
// whatever the mix of lengths. Each item depends only on its own segment's rows, so an item's
// numbers do not depend on the batch it rides in or on the thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*);

namespace {

constexpr int64_t BQ = 64;   // query positions per item (measured: 32 and 128 no faster)
constexpr int64_t BK = 512;  // keys per online-softmax step

// Column-major BLAS: C (m x n) = alpha op(A) op(B) + beta C.
void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// exp(x) for x <= 0 (softmax after subtracting the row max), written so the compiler vectorises
// it: Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial for e^r, 2^n put into the
// exponent bits. Relative error below 2e-7; below -87 it returns about 1.6e-38 instead of 0,
// which only ever multiplies zeros.
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}

struct Item {
  int64_t seg, head, r0, r1, k0;  // kv head, own query rows r0..r1-1, first visible key position k0
};

struct Args {
  const float *q, *k, *v;
  float* out;
  int64_t ldq, ldk, ldv, ldo, g, d, window;
  float scale;
  const int64_t *starts, *prefix_starts, *prefix_lens;
};

// Scratch of one thread: the stacked query block, its output accumulator, one block of scores,
// and the running max and sum of every row.
struct Scratch {
  std::vector<float> q, o, s, max, sum;
  Scratch(int64_t rows, int64_t d) : q(rows * d), o(rows * d), s(rows * BK), max(rows), sum(rows) {}
};

// Packed row of the key at position c of segment `seg`.
inline int64_t key_row(const Args& a, int64_t seg, int64_t c) {
  const int64_t p = a.prefix_lens[seg];
  return c < p ? a.prefix_starts[seg] + c : a.starts[seg] + c - p;
}

void run_item(const Args& a, const Item& w, Scratch& t) {
  const int64_t n = w.r1 - w.r0, rows = a.g * n, d = a.d, base = a.starts[w.seg];
  const int64_t plen = a.prefix_lens[w.seg], end = plen + w.r1;  // keys at positions k0 .. end-1
  for (int64_t j = 0; j < a.g; ++j)  // row j * n + i: query head head * g + j, position r0 + i
    for (int64_t i = 0; i < n; ++i) {
      const float* src = a.q + (base + w.r0 + i) * a.ldq + (w.head * a.g + j) * d;
      float* dst = t.q.data() + (j * n + i) * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * a.scale;
    }
  std::fill_n(t.o.begin(), rows * d, 0.0f);
  std::fill_n(t.max.begin(), rows, -INFINITY);
  std::fill_n(t.sum.begin(), rows, 0.0f);
  for (int64_t c0 = w.k0, nk; c0 < end; c0 += nk) {
    nk = std::min(BK, (c0 < plen ? plen : end) - c0);  // a block never straddles prompt and own rows
    const int64_t r = key_row(a, w.seg, c0);
    const float* kp = a.k + r * a.ldk + w.head * d;
    const float* vp = a.v + r * a.ldv + w.head * d;
    // scores, row-major (rows x nk) = Q (rows x d) K^T; as column-major: S^T = K Q^T
    gemm('T', 'N', nk, rows, d, 1.0f, kp, a.ldk, t.q.data(), d, 0.0f, t.s.data(), nk);
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t pos = plen + w.r0 + row % n;
      const int64_t lo = std::max<int64_t>(a.window > 0 ? pos - a.window + 1 - c0 : 0, 0);
      const int64_t hi = std::min(nk, pos - c0 + 1);  // visible keys of this row: lo .. hi-1
      float* s = t.s.data() + row * nk;
      if (hi <= lo) {
        std::fill_n(s, nk, 0.0f);
        continue;
      }
      float m = t.max[row];
#pragma omp simd reduction(max : m)
      for (int64_t c = lo; c < hi; ++c) m = m > s[c] ? m : s[c];
      float l = 0.0f;
#pragma omp simd reduction(+ : l)
      for (int64_t c = lo; c < hi; ++c) {
        const float p = exp_nonpositive(s[c] - m);
        s[c] = p;
        l += p;
      }
      std::fill(s, s + lo, 0.0f);
      std::fill(s + hi, s + nk, 0.0f);
      if (m != t.max[row]) {  // a new max: rescale what this row has accumulated so far
        const float alpha = exp_nonpositive(t.max[row] - m);
        float* o = t.o.data() + row * d;
        for (int64_t c = 0; c < d; ++c) o[c] *= alpha;
        t.sum[row] *= alpha;
        t.max[row] = m;
      }
      t.sum[row] += l;
    }
    // O (rows x d) += P (rows x nk) V; as column-major: O^T += V^T P^T
    gemm('N', 'N', d, rows, nk, 1.0f, vp, a.ldv, t.s.data(), nk, 1.0f, t.o.data(), d);
  }
  for (int64_t j = 0; j < a.g; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = j * n + i;
      const float inv = 1.0f / t.sum[row];
      const float* src = t.o.data() + row * d;
      float* dst = a.out + (base + w.r0 + i) * a.ldo + (w.head * a.g + j) * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * inv;
    }
}

}  // namespace

// Returns 0, or 1 when the shapes are inconsistent (the Python wrapper checks them first).
extern "C" int rs_causal_attention_f32(const float* q, const float* k, const float* v, float* out,
                                       int64_t ldq, int64_t ldk, int64_t ldv, int64_t ldo,
                                       int64_t hq, int64_t hk, int64_t d, const int64_t* starts,
                                       const int64_t* lens, const int64_t* prefix_starts,
                                       const int64_t* prefix_lens, int64_t nseg, int64_t window,
                                       float scale, int64_t threads) {
  if (hk <= 0 || hq % hk != 0 || d <= 0 || threads <= 0) return 1;
  const Args a{q, k, v, out, ldq, ldk, ldv, ldo, hq / hk, d, window, scale, starts, prefix_starts,
               prefix_lens};
  std::vector<Item> items;
  for (int64_t s = 0; s < nseg; ++s)
    for (int64_t r0 = 0; r0 < lens[s]; r0 += BQ) {
      const int64_t first = prefix_lens[s] + r0;  // position of the block's first query
      const int64_t k0 = window > 0 ? std::max<int64_t>(first - window + 1, 0) : 0;
      for (int64_t h = 0; h < hk; ++h) items.push_back({s, h, r0, std::min(lens[s], r0 + BQ), k0});
    }
  std::stable_sort(items.begin(), items.end(),
                   [&](const Item& x, const Item& y) {
                     return prefix_lens[x.seg] + x.r1 - x.k0 > prefix_lens[y.seg] + y.r1 - y.k0;
                   });
  std::atomic<size_t> next(0);
#pragma omp parallel num_threads(threads)
  {
    Scratch scratch(a.g * BQ, d);
    for (size_t i = next.fetch_add(1); i < items.size(); i = next.fetch_add(1))
      run_item(a, items[i], scratch);
  }
  return 0;
}
