/*
 * Paged attention on CPU: every request's keys and values are read where they lie,
 * through its block table. No gather copy, no padding, one call per layer for the
 * whole batch (decodes and prompt chunks alike).
 *
 * The block-table walk, for one request with block_size B = 4 and 10 positions:
 *
 *     block_tables[s] = [ 7,          2,          9     , (padding) ]
 *                         |           |           |
 *     position p:      0  1  2  3 | 4  5  6  7 | 8  9
 *     slot:           28 29 30 31 | 8  9 10 11 |36 37      slot = table[p / B] * B + p % B
 *                         |
 *     k_cache: (num_slots, KV, D), any slot and head strides, head_dim contiguous
 *              row `slot`, kv head h  ->  k_cache + slot * stride_slot + h * stride_head
 *
 * The virtual cache is the same walk with a one-entry table whose block is the
 * request's whole row (B = row length).
 *
 * Work is cut into items of (request, kv heads, query tile, KV partition):
 *
 *     query tile:    up to 16 of the request's query tokens, times the G query heads
 *                    that share each kv head (GQA): R = tokens x heads x G rows
 *     kv heads:      a run of kv heads whose rows fit in 128 (all of a decode's when the
 *                    batch is big enough): a slot's heads lie side by side, so an item
 *                    reads each slot's K and V rows whole, in the order they lie
 *     KV partition:  up to 512 positions of its context, so a single long decode still
 *                    spreads over every thread (flash-decoding)
 *
 * An item walks its partition in tiles of 32 positions and keeps, per query row,
 * an online softmax: the running max m, the running sum l and the unnormalised
 * output acc, rescaled whenever m grows. Memory per item is O(tile), whatever the
 * context. Query token i of a request sits at position num_computed + i and sees
 * positions 0 ..= num_computed + i (causal; a decode sees its whole context).
 * An item that is its (request, head, query tile)'s only partition (every context up
 * to 512 positions) writes its rows straight to the output, acc / l. Longer contexts
 * leave partial rows, and a second pass merges each group's partitions:
 *
 *     M = max_k m_k     L = sum_k l_k e^(m_k - M)     out = sum_k acc_k e^(m_k - M) / L
 *
 * The head dimension is a template parameter for the common sizes (64, 128), so the
 * compiler unrolls every loop over it into whole vector registers; other sizes take
 * the same code with the size known only at run time. A tile's slots come from one
 * division and a walk along the blocks, and the next tile's rows (the next item's first,
 * after an item's last) are asked for a share per query row while the current tile is
 * worked on (blocks sit anywhere in the pool: `Lookahead`).
 *
 * Caches are float32 or bfloat16, and every sum accumulates in float32. The loops are
 * written for the compiler's vectoriser (-O3 -march=native, `omp simd`), exp included;
 * with AVX-512 the two inner products of a tile (scores, weighted values) are written
 * with intrinsics (float32 caches), and with AVX512-BF16 bfloat16 caches are multiplied
 * as bfloat16 pairs, never widened (`run_item_bf16`). With AMX, bfloat16 items of up to 16
 * query rows per kv head (every decode) run both products on the tile unit instead
 * (`run_item_amx`). Without AVX512-BF16, bfloat16 tiles are widened to float32 once per tile.
 */

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "amx_tiles.h"
#if defined(KVOS_AMX)
#include <optional>
#endif

namespace {

using kvos::exp_nonpositive;
using kvos::widen;

constexpr int64_t kQueryTile = 16;      // query tokens per item
constexpr int64_t kKeyTile = 32;        // positions scored together
constexpr int64_t kPartition = 512;     // positions per item (a multiple of kKeyTile)
constexpr int64_t kMaxRows = kQueryTile * 8;  // query rows of an item that shares kv heads
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

#if defined(__AVX512F__)
/* With AVX-512 and a head size of a whole number of vectors (kD % 16 == 0), a tile's scores and
 * its weighted sum of values are written with intrinsics instead of left to the vectoriser:
 *
 *   scores: `dot` per key ends in a horizontal sum of one vector (a shuffle tree per key). Here
 *           16 keys' products stay as 16 vectors, and one transpose-and-add tree (45 shuffles and
 *           adds) turns them into the 16 scores at once, about 3 operations per key.
 *   values: `axpy` per key loads and stores the output row. Here the row stays in registers
 *           for the whole tile, in two sets (even and odd keys) so consecutive FMAs do not wait
 *           on each other.
 */

/* Lane j of the result is the sum of v[j]'s 16 lanes. */
inline __m512 transpose_sum16(const __m512* v) {
  __m512 a[8];
  for (int i = 0; i < 8; ++i)  // 128-bit lane L of a[i]: v[2i]'s partials at 0 and 2, v[2i+1]'s at 1 and 3
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 b[4];
  for (int i = 0; i < 4; ++i) {  // lane L of b[i]: the lane-L sums of v[4i .. 4i+3]
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // Sum over the four 128-bit lanes: lanes (0, 2) plus lanes (1, 3), twice.
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* scores[j] = q_row . keys[j] for j < n. */
template <int64_t kD>
inline void tile_scores(const float* __restrict q_row, const float* const* keys, int64_t n, float* scores) {
  constexpr int kV = static_cast<int>(kD / 16);
  __m512 q[kV];
  for (int v = 0; v < kV; ++v) q[v] = _mm512_loadu_ps(q_row + 16 * v);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - j0);
    __m512 part[16];
#pragma GCC unroll 16
    for (int64_t jj = 0; jj < 16; ++jj) {
      if (jj < m) {
        const float* key = keys[j0 + jj];
        __m512 sum = _mm512_mul_ps(q[0], _mm512_loadu_ps(key));
        for (int v = 1; v < kV; ++v) sum = _mm512_fmadd_ps(q[v], _mm512_loadu_ps(key + 16 * v), sum);
        part[jj] = sum;
      } else {
        part[jj] = _mm512_setzero_ps();
      }
    }
    _mm512_mask_storeu_ps(scores + j0, static_cast<__mmask16>((1u << m) - 1u), transpose_sum16(part));
  }
}

/* acc_row += sum_j weights[j] * values[j] for j < n. */
template <int64_t kD>
inline void tile_weighted_sum(float* __restrict acc_row, const float* weights, const float* const* values, int64_t n) {
  constexpr int kV = static_cast<int>(kD / 16);
  __m512 even[kV], odd[kV];
  for (int v = 0; v < kV; ++v) {
    even[v] = _mm512_loadu_ps(acc_row + 16 * v);
    odd[v] = _mm512_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 1 < n; j += 2) {
    const __m512 w0 = _mm512_set1_ps(weights[j]);
    const __m512 w1 = _mm512_set1_ps(weights[j + 1]);
    for (int v = 0; v < kV; ++v) {
      even[v] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(values[j] + 16 * v), even[v]);
      odd[v] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(values[j + 1] + 16 * v), odd[v]);
    }
  }
  if (j < n) {
    const __m512 w0 = _mm512_set1_ps(weights[j]);
    for (int v = 0; v < kV; ++v) even[v] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(values[j] + 16 * v), even[v]);
  }
  for (int v = 0; v < kV; ++v) _mm512_storeu_ps(acc_row + 16 * v, _mm512_add_ps(even[v], odd[v]));
}

template <int64_t kD>
constexpr bool kVectorTiles = kD > 0 && kD % 16 == 0 && kD <= 256;
#else
template <int64_t kD>
constexpr bool kVectorTiles = false;
#endif

/* One request in the batch: its query rows and how much of its context is cached. */
struct Seq {
  int64_t token_start;
  int64_t num_tokens;
  int64_t num_computed;
};

/* A unit of parallel work; its R = (q_end - q_begin) * (h_end - h_begin) * G partial rows start at
 * `row`. Row r is query token q_begin + r / (heads * G) and query head h_begin * G + r % (heads * G). */
struct Item {
  int64_t seq;
  int64_t h_begin, h_end;  // kv heads
  int64_t q_begin, q_end;  // query tokens, relative to the request
  int64_t p_begin, p_end;  // context positions
  int64_t row;     // first partial row (items with one partition have none: row = -1)
};

/* Partitions of one (request, kv head, query tile): items [first, first + count). */
struct Group {
  int64_t first;
  int64_t count;
};

/* Where a position's K and V rows are, for one request and the kv heads of an item. */
template <typename scalar_t>
struct KVWalk {
  const scalar_t* k_base;  // k_cache + h_begin * stride_head
  const scalar_t* v_base;
  int64_t k_stride;  // between slots
  int64_t v_stride;
  int64_t k_head_stride;  // between kv heads
  int64_t v_head_stride;
  const int32_t* table;
  int64_t block_size;
};

/* The slots of positions [start, start + n): one division for the tile, then a walk along
 * the blocks (a division per position cost more than the dot products at small head sizes). */
template <typename scalar_t>
inline void tile_slots(const KVWalk<scalar_t>& walk, int64_t start, int64_t n, int64_t* slots) {
  int64_t block = start / walk.block_size;
  int64_t offset = start - block * walk.block_size;
  for (int64_t j = 0; j < n; ++j) {
    slots[j] = static_cast<int64_t>(walk.table[block]) * walk.block_size + offset;
    if (++offset == walk.block_size) {
      offset = 0;
      ++block;
    }
  }
}

/* Pointers to the cache's own K and V rows of `n` slots, for the walk's head number `head`. */
template <typename scalar_t>
inline void tile_rows(const KVWalk<scalar_t>& walk, const int64_t* slots, int64_t n, int64_t head,
                      const scalar_t** keys, const scalar_t** values) {
  const scalar_t* k_head = walk.k_base + head * walk.k_head_stride;
  const scalar_t* v_head = walk.v_base + head * walk.v_head_stride;
  for (int64_t j = 0; j < n; ++j) {
    keys[j] = k_head + slots[j] * walk.k_stride;
    values[j] = v_head + slots[j] * walk.v_stride;
  }
}

/* Asks for the cache line at p. An asm statement rather than __builtin_prefetch: GCC 12's mod-ref
 * analysis takes a function whose only effect is __builtin_prefetch for one without effects and
 * deletes the calls to it, which left this kernel's earlier prefetch helper compiled out (no prefetch
 * instruction in the built kernel) since it was written. */
inline void prefetch_line(const char* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p);
#endif
}

/* The K and V rows of the tile a thread works on next (the rest of this item's partition, or the
 * next item's first tile), asked for a share at a time while the current tile is worked on: a query
 * row's work on a kv head is cut into kAsksPerRow pieces (the two halves of its scores, the softmax,
 * the two halves of its value sum), and before each piece the next share of that head's rows in the
 * next tile is asked for.
 *
 * The hardware prefetchers alone leave each new block's first lines to wait on memory (a block is
 * a few kilobytes anywhere in the pool), and the arithmetic of a tile does not overlap them: the
 * kernel read KV at a third of the read bandwidth. Asking for the whole next tile at the tile's
 * start (a few hundred lines against the core's few dozen outstanding misses) measured no faster
 * than asking for nothing. One share per row measured 1.4-1.6x a layer at batch 16-64 on the AMD EPYC
 * (`benchmarks/paged_kernel_ab`, bfloat16); five per row 1.2-1.5x more (two per row 1.1x, three 1.15-1.2x;
 * seven, the value sum in quarters, less than five: the extra pieces cost more than they hid). The
 * halves' offsets are constants: at run time they cost 5-7%. */
constexpr int64_t kAsksPerRow = 5;
constexpr int64_t kHalfTile = kKeyTile / 2;

template <typename scalar_t>
struct Lookahead {
  const scalar_t* k_base = nullptr;
  const scalar_t* v_base = nullptr;
  int64_t k_stride = 0, v_stride = 0, k_head_stride = 0, v_head_stride = 0;
  int64_t slots[kKeyTile];
  int64_t n = 0;  // positions of the tile (0: nothing to ask for)
  int64_t heads = 0;

  /* Aim at positions [start, end) (at most a tile) of `walk`'s `heads` kv heads. */
  void aim(const KVWalk<scalar_t>& walk, int64_t num_heads, int64_t start, int64_t end) {
    n = std::clamp<int64_t>(end - start, 0, kKeyTile);
    if (n == 0) return;
    tile_slots(walk, start, n, slots);
    k_base = walk.k_base;
    v_base = walk.v_base;
    k_stride = walk.k_stride;
    v_stride = walk.v_stride;
    k_head_stride = walk.k_head_stride;
    v_head_stride = walk.v_head_stride;
    heads = num_heads;
  }

  /* Aim at the tile after the current one: the next positions of this item up to `end`, else `next` (the
   * thread's next item's first tile, or nothing when null). */
  void follow(const KVWalk<scalar_t>& walk, int64_t num_heads, int64_t start, int64_t end, const Lookahead* next) {
    if (start < end)
      aim(walk, num_heads, start, end);
    else if (next != nullptr)
      *this = *next;
    else
      n = 0;
  }

  /* Ask for share `part` of `parts` of kv head `head`'s rows (nothing past the tile's heads). */
  void ask(int64_t head, int64_t part, int64_t parts, int64_t head_dim) const {
    if (head >= heads) return;
    const int64_t begin = n * part / parts, end = n * (part + 1) / parts;
    const scalar_t* k_head = k_base + head * k_head_stride;
    const scalar_t* v_head = v_base + head * v_head_stride;
    const int64_t lines = std::max<int64_t>(1, head_dim * static_cast<int64_t>(sizeof(scalar_t)) / 64);
    for (int64_t j = begin; j < end; ++j) {
      const char* k_row = reinterpret_cast<const char*>(k_head + slots[j] * k_stride);
      const char* v_row = reinterpret_cast<const char*>(v_head + slots[j] * v_stride);
      for (int64_t c = 0; c < lines; ++c) {
        prefetch_line(k_row + 64 * c);
        prefetch_line(v_row + 64 * c);
      }
    }
  }
};

/* A row's running max grows to m_new (if it does): its sum and output so far are rescaled. */
inline void raise_max(float m_new, float& m, float& l, float* acc_row, int64_t head_dim) {
  if (!(m_new > m)) return;  // NaN included, as `m_new > m` was
  const float alpha = m == kNegInf ? 0.0f : exp_nonpositive(m - m_new);
  l *= alpha;
#pragma omp simd
  for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= alpha;
  m = m_new;
}

/* One row's online-softmax step over a tile's `visible` scores: the running max m and sum l
 * move on, the scores become their weights e^(s - m), and acc is rescaled if m grew.
 * The weights past `visible`, up to kKeyTile, are 0 (the bfloat16 value sum reads them in pairs). */
#if defined(__AVX512F__)
/* exp_nonpositive on 16 lanes: the same steps (clamp, 2^n by the exponent bits, degree-7
 * polynomial), fused multiply-adds where the compiler contracts the scalar version's. */
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(clamped, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 g = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), e);
}

/* The tile's two vectors of scores, lanes past `visible` at -inf: one max, one sum, 16 exps at a
 * time (a scalar max over 32 scores was a chain of 32 dependent instructions per row). */
inline void online_softmax_tile(float* scores, int64_t visible, float& m, float& l, float* acc_row,
                                int64_t head_dim) {
  static_assert(kKeyTile == 32, "two vectors of scores per tile");
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const __mmask16 lo_mask = static_cast<__mmask16>(visible >= 16 ? 0xFFFFu : (1u << visible) - 1u);
  const __mmask16 hi_mask =
      static_cast<__mmask16>(visible >= 32 ? 0xFFFFu : visible <= 16 ? 0u : (1u << (visible - 16)) - 1u);
  const __m512 lo = _mm512_mask_loadu_ps(neg_inf, lo_mask, scores);
  const __m512 hi = _mm512_mask_loadu_ps(neg_inf, hi_mask, scores + 16);
  const float m_new = std::max(m, _mm512_reduce_max_ps(_mm512_max_ps(lo, hi)));
  const __m512 shift = _mm512_set1_ps(m_new);
  const __m512 w_lo = exp_nonpositive16(_mm512_sub_ps(lo, shift));
  const __m512 w_hi = exp_nonpositive16(_mm512_sub_ps(hi, shift));
  _mm512_storeu_ps(scores, w_lo);
  _mm512_storeu_ps(scores + 16, w_hi);
  raise_max(m_new, m, l, acc_row, head_dim);
  l += _mm512_reduce_add_ps(_mm512_add_ps(w_lo, w_hi));
}
#else
inline void online_softmax_tile(float* scores, int64_t visible, float& m, float& l, float* acc_row,
                                int64_t head_dim) {
  float tile_max = kNegInf;
  for (int64_t j = 0; j < visible; ++j) tile_max = std::max(tile_max, scores[j]);
  const float m_new = std::max(m, tile_max);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < visible; ++j) {
    scores[j] = exp_nonpositive(scores[j] - m_new);
    sum += scores[j];
  }
  raise_max(m_new, m, l, acc_row, head_dim);
  l += sum;
  for (int64_t j = visible; j < kKeyTile; ++j) scores[j] = 0.0f;
}
#endif

/* Pointers to the float32 K and V rows of `n` slots for head number `head`: the cache rows
 * themselves for a float32 cache, rows widened into `k_buf`/`v_buf` for bfloat16. */
inline void load_tile(const KVWalk<float>& walk, const int64_t* slots, int64_t n, int64_t head, int64_t /*head_dim*/,
                      float* /*k_buf*/, float* /*v_buf*/, const float** keys, const float** values) {
  tile_rows(walk, slots, n, head, keys, values);
}

inline void load_tile(const KVWalk<c10::BFloat16>& walk, const int64_t* slots, int64_t n, int64_t head,
                      int64_t head_dim, float* k_buf, float* v_buf, const float** keys, const float** values) {
  const c10::BFloat16* k_head = walk.k_base + head * walk.k_head_stride;
  const c10::BFloat16* v_head = walk.v_base + head * walk.v_head_stride;
  for (int64_t j = 0; j < n; ++j) {
    widen(k_buf + j * head_dim, k_head + slots[j] * walk.k_stride, head_dim);
    widen(v_buf + j * head_dim, v_head + slots[j] * walk.v_stride, head_dim);
    keys[j] = k_buf + j * head_dim;
    values[j] = v_buf + j * head_dim;
  }
}

/* Run one item: online softmax over its partition into partial rows (acc, m, l).
 * kD is the head dimension when known at compile time, 0 when only `head_dim_rt` knows it. */
template <typename scalar_t, int64_t kD>
void run_item(const Item& item, const Seq& seq, const KVWalk<scalar_t>& walk, const float* q, int64_t q_stride_token,
              int64_t group, int64_t head_dim_rt, float scale, float* acc, float* m, float* l, float* q_buf,
              float* k_buf, float* v_buf, const Lookahead<scalar_t>* next) {
  const int64_t head_dim = kD > 0 ? kD : head_dim_rt;
  const int64_t heads = item.h_end - item.h_begin;
  const int64_t row_stride = heads * group;  // rows per query token
  const int64_t num_rows = (item.q_end - item.q_begin) * row_stride;
  // Query rows of this tile, scaled once.
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t token = seq.token_start + item.q_begin + r / row_stride;
    const float* src = q + token * q_stride_token + (item.h_begin * group + r % row_stride) * head_dim;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) q_buf[r * head_dim + d] = src[d] * scale;
    m[r] = kNegInf;
    l[r] = 0.0f;
    std::fill(acc + r * head_dim, acc + (r + 1) * head_dim, 0.0f);
  }
  const float* keys[kKeyTile];
  const float* values[kKeyTile];
  float scores[kKeyTile];
  int64_t slots[kKeyTile];
  Lookahead<scalar_t> ahead;
  const int64_t parts = kAsksPerRow * num_rows / heads;  // shares of a head's rows in the next tile
  for (int64_t start = item.p_begin; start < item.p_end; start += kKeyTile) {
    const int64_t n = std::min(kKeyTile, item.p_end - start);
    tile_slots(walk, start, n, slots);
    ahead.follow(walk, heads, start + kKeyTile, item.p_end, next);
    for (int64_t h = 0; h < heads; ++h) {
      load_tile(walk, slots, n, h, head_dim, k_buf, v_buf, keys, values);
      int64_t part = 0;
      for (int64_t r0 = h * group; r0 < num_rows; r0 += row_stride) {  // head h's rows of each token
        const int64_t visible_end = seq.num_computed + item.q_begin + r0 / row_stride + 1;  // causal limit
        const int64_t visible = std::min(n, visible_end - start);
        for (int64_t r = r0; r < r0 + group; ++r) {
          // The row's work in kAsksPerRow pieces, the next share of the next tile asked for before each.
          ahead.ask(h, part++, parts, head_dim);
          if (visible <= 0) {
            for (int64_t k = 1; k < kAsksPerRow; ++k) ahead.ask(h, part++, parts, head_dim);
            continue;
          }
          const float* q_row = q_buf + r * head_dim;
          const int64_t half = std::min(kHalfTile, visible);
          const auto score = [&](int64_t begin, int64_t end) {
            if constexpr (kVectorTiles<kD>) {
              tile_scores<kD>(q_row, keys + begin, end - begin, scores + begin);
            } else {
              for (int64_t j = begin; j < end; ++j) scores[j] = dot(q_row, keys[j], head_dim);
            }
          };
          float* acc_row = acc + r * head_dim;
          const auto add_values = [&](int64_t begin, int64_t end) {
            if constexpr (kVectorTiles<kD>) {
              tile_weighted_sum<kD>(acc_row, scores + begin, values + begin, end - begin);
            } else {
              for (int64_t j = begin; j < end; ++j) axpy(acc_row, scores[j], values[j], head_dim);
            }
          };
          score(0, half);
          ahead.ask(h, part++, parts, head_dim);
          score(half, visible);
          ahead.ask(h, part++, parts, head_dim);
          online_softmax_tile(scores, visible, m[r], l[r], acc_row, head_dim);
          ahead.ask(h, part++, parts, head_dim);
          add_values(0, half);
          ahead.ask(h, part++, parts, head_dim);
          add_values(half, visible);
        }
      }
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* bfloat16 caches on a CPU with AVX512-BF16 (kD % 32 == 0): products of bfloat16 pairs summed
 * into float32 lanes (vdpbf16ps), so keys and values are never widened. Two things are rounded
 * to bfloat16 that the float32 path keeps: the queries, which a bfloat16 model's projection
 * produced in bfloat16 anyway (the scale is applied to the scores, so nothing is lost), and
 * the softmax weights before they multiply the values (relative error 2^-9 each; what flash
 * attention does on GPUs). Scores, sums and outputs accumulate in float32.
 *
 * Scores: lane i of a key's product vector holds q[2i] k[2i] + q[2i+1] k[2i+1]; 16 keys'
 * vectors go through the same transpose-and-add tree as the float32 path.
 * Values: two keys at a time. unpacklo/hi_epi16 of rows j and j+1 put (v_j[d], v_j+1[d]) in
 * one 32-bit lane, and the pair of weights (w_j, w_j+1) in every lane of the other operand,
 * so one instruction adds w_j v_j[d] + w_j+1 v_j+1[d] for 16 dims. The unpacks take dims
 * 0-3, 8-11, 16-19, 24-27 (lo) and 4-7, ... (hi) of each 32: one permute per 16 puts them
 * back in order at the end of the tile. */

using bf16_t = c10::BFloat16;

template <int64_t kD>
constexpr bool kBF16Tiles = kD > 0 && kD % 32 == 0 && kD <= 256;

template <int64_t kD>
inline void tile_scores_bf16(const __m512bh* q, const bf16_t* const* keys, int64_t n, float scale, float* scores) {
  constexpr int kZ = static_cast<int>(kD / 32);
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - j0);
    __m512 part[16];
#pragma GCC unroll 16
    for (int64_t jj = 0; jj < 16; ++jj) {
      __m512 sum = _mm512_setzero_ps();
      if (jj < m) {
        const bf16_t* key = keys[j0 + jj];
        for (int z = 0; z < kZ; ++z) sum = _mm512_dpbf16_ps(sum, q[z], (__m512bh)_mm512_loadu_si512(key + 32 * z));
      }
      part[jj] = sum;
    }
    const __m512 out = _mm512_mul_ps(transpose_sum16(part), scale_v);
    _mm512_mask_storeu_ps(scores + j0, static_cast<__mmask16>((1u << m) - 1u), out);
  }
}

/* dst[0, 32) += the sums of unpacklo_epi16 (`lo`) and unpackhi_epi16 (`hi`) pair products, put back in dim
 * order: lo holds dims 0-3, 8-11, 16-19, 24-27 and hi dims 4-7, 12-15, 20-23, 28-31. Always inlined: without
 * the attribute the kernel measured 6% slower at 64 x 256 (paged_kernel_ab, twice). */
__attribute__((always_inline)) inline void add_unpacked(float* __restrict dst, __m512 lo, __m512 hi) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_permutex2var_ps(lo, first, hi)));
  _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_loadu_ps(dst + 16), _mm512_permutex2var_ps(lo, second, hi)));
}

/* acc_row += sum_j weights[j] * values[j] for j < n; weights[n] must be 0 when n is odd, and 32 floats
 * from `weights` must be readable (the pairs are converted 32 at a time). */
template <int64_t kD>
inline void tile_weighted_sum_bf16(float* __restrict acc_row, const float* weights, const bf16_t* const* values,
                                   int64_t n) {
  constexpr int kZ = static_cast<int>(kD / 32);
  alignas(64) bf16_t w16[kKeyTile];
  const __m512 w_lo = _mm512_loadu_ps(weights);
  const __m512 w_hi = _mm512_loadu_ps(weights + 16);
  _mm512_store_si512(reinterpret_cast<__m512i*>(w16), (__m512i)_mm512_cvtne2ps_pbh(w_hi, w_lo));
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(w16);
  __m512 lo[kZ], hi[kZ];
  for (int z = 0; z < kZ; ++z) lo[z] = hi[z] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 2) {
    const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pairs[j / 2]));
    for (int z = 0; z < kZ; ++z) {
      const __m512i a = _mm512_loadu_si512(values[j] + 32 * z);
      const __m512i b = j + 1 < n ? _mm512_loadu_si512(values[j + 1] + 32 * z) : _mm512_setzero_si512();
      lo[z] = _mm512_dpbf16_ps(lo[z], (__m512bh)_mm512_unpacklo_epi16(a, b), w);
      hi[z] = _mm512_dpbf16_ps(hi[z], (__m512bh)_mm512_unpackhi_epi16(a, b), w);
    }
  }
  for (int z = 0; z < kZ; ++z) add_unpacked(acc_row + 32 * z, lo[z], hi[z]);
}

/* run_item for bfloat16 caches with AVX512-BF16: the same online softmax, on bfloat16 pairs. */
template <int64_t kD>
void run_item_bf16(const Item& item, const Seq& seq, const KVWalk<bf16_t>& walk, const float* q, int64_t q_stride_token,
                   int64_t group, float scale, float* acc, float* m, float* l, const Lookahead<bf16_t>* next) {
  constexpr int kZ = static_cast<int>(kD / 32);
  const int64_t heads = item.h_end - item.h_begin;
  const int64_t row_stride = heads * group;  // rows per query token
  const int64_t num_rows = (item.q_end - item.q_begin) * row_stride;
  __m512bh q_rows[kMaxRows][kZ];
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t token = seq.token_start + item.q_begin + r / row_stride;
    const float* src = q + token * q_stride_token + (item.h_begin * group + r % row_stride) * kD;
    for (int z = 0; z < kZ; ++z)
      q_rows[r][z] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 32 * z + 16), _mm512_loadu_ps(src + 32 * z));
    m[r] = kNegInf;
    l[r] = 0.0f;
    std::fill(acc + r * kD, acc + (r + 1) * kD, 0.0f);
  }
  const bf16_t* keys[kKeyTile];
  const bf16_t* values[kKeyTile];
  alignas(64) float scores[kKeyTile + kHalfTile] = {};  // the second half's value sum converts 32 from its middle
  int64_t slots[kKeyTile];
  Lookahead<bf16_t> ahead;
  const int64_t parts = kAsksPerRow * num_rows / heads;  // shares of a head's rows in the next tile
  for (int64_t start = item.p_begin; start < item.p_end; start += kKeyTile) {
    const int64_t n = std::min(kKeyTile, item.p_end - start);
    tile_slots(walk, start, n, slots);
    ahead.follow(walk, heads, start + kKeyTile, item.p_end, next);
    for (int64_t h = 0; h < heads; ++h) {
      tile_rows(walk, slots, n, h, keys, values);
      int64_t part = 0;
      for (int64_t r0 = h * group; r0 < num_rows; r0 += row_stride) {  // head h's rows of each token
        const int64_t visible_end = seq.num_computed + item.q_begin + r0 / row_stride + 1;  // causal limit
        const int64_t visible = std::min(n, visible_end - start);
        for (int64_t r = r0; r < r0 + group; ++r) {
          // The row's work in kAsksPerRow pieces, the next share of the next tile asked for before each.
          ahead.ask(h, part++, parts, kD);
          if (visible <= 0) {
            for (int64_t k = 1; k < kAsksPerRow; ++k) ahead.ask(h, part++, parts, kD);
            continue;
          }
          const int64_t half = std::min(kHalfTile, visible);
          tile_scores_bf16<kD>(q_rows[r], keys, half, scale, scores);
          ahead.ask(h, part++, parts, kD);
          if (visible > kHalfTile)
            tile_scores_bf16<kD>(q_rows[r], keys + kHalfTile, visible - kHalfTile, scale, scores + kHalfTile);
          ahead.ask(h, part++, parts, kD);
          float* acc_row = acc + r * kD;
          online_softmax_tile(scores, visible, m[r], l[r], acc_row, kD);
          ahead.ask(h, part++, parts, kD);
          tile_weighted_sum_bf16<kD>(acc_row, scores, values, half);
          ahead.ask(h, part++, parts, kD);
          if (visible > kHalfTile)
            tile_weighted_sum_bf16<kD>(acc_row, scores + kHalfTile, values + kHalfTile, visible - kHalfTile);
        }
      }
    }
  }
}

#if defined(KVOS_AMX)
/* bfloat16 caches on a CPU with AMX: both products of a tile on the tile unit (TDPBF16PS, a
 * 16 x 16 float32 block += (16 x 32) x (32 x 16) bfloat16 products per instruction), when an item's
 * query rows per kv head (tokens x group, R) fit in one tile's 16 rows. The AVX512-BF16 path spent
 * about 8 vector instructions per (query row, key); here the tile unit does the products and the
 * vector units only reshape, so the kernel waits on memory instead of on its own arithmetic.
 *
 *   scores  S^T (16 keys x R) = K (16 keys x D) . Q^T (D x R): the K tile is loaded straight from
 *           the cache (16 consecutive slots, the slot stride as the row stride); Q^T is built
 *           once per item in the pair layout TDPBF16PS wants (dword p of column j = q_j[2p..2p+1]).
 *           Each query row's 32 scores are gathered out of S^T for the online softmax.
 *   values  O (R x 16 dims) = P (R x 32 keys) . V: the weights are a row each, and V is
 *           re-laid as pairs of keys (unpacklo/hi_epi16 of rows 2p and 2p+1, the same unpacks as
 *           the AVX512-BF16 path but once per kv head instead of once per query row); the
 *           unpacks' dim order is undone when O is added to the running output.
 *
 * The same roundings as the AVX512-BF16 path (queries and weights to bfloat16, every sum in
 * float32). A thread configures the tiles for its R and gives the unit back as it found it
 * (`kvos::TileUse`); where Linux refuses the tile state, the AVX512-BF16 path runs. */

/* The tiles (GCC's tile intrinsics take the tile's number as a literal):
 *   0  S^T  16 keys x R float32         3  P  R rows x 32 keys
 *   1  K    16 keys x 32 dims           4  V  16 key pairs x 16 dims
 *   2  Q^T  16 dim pairs x R            5  O  R rows x 16 dims float32 */
constexpr int64_t kAmxRows = 16;

/* The tiles shaped for R query rows per kv head, loaded when R changes. */
class AttentionTiles {
 public:
  void configure(int64_t rows) {
    if (rows == rows_) return;
    kvos::TileConfig config;
    config.set(0, 16, 4 * rows);
    config.set(1, 16, 64);
    config.set(2, 16, 4 * rows);
    config.set(3, rows, 64);
    config.set(4, 16, 64);
    config.set(5, rows, 64);
    use_.load(config);
    rows_ = rows;
  }

 private:
  kvos::TileUse use_;
  int64_t rows_ = 0;
};

/* A thread's buffers for the tile loads and stores of run_item_amx. */
template <int64_t kD>
struct AmxScratch {
  static constexpr int kZ = static_cast<int>(kD / 32);
  alignas(64) bf16_t keys[16 * kD];             // a short or scattered run of keys, copied
  alignas(64) float scores[kKeyTile * kAmxRows];  // S^T of the tile: [key][row]
  alignas(64) bf16_t weights[kAmxRows * kKeyTile];  // P: [row][key]
  alignas(64) uint32_t values[kZ][2][16][16];   // V in key pairs: [32-dim chunk][lo/hi][pair][dim]
  alignas(64) float out[kAmxRows * kD];         // O, dims in the unpacks' order
  std::vector<uint32_t> query;                  // Q^T per kv head: [head][chunk][pair][row]
};

template <int64_t kD>
void run_item_amx(const Item& item, const Seq& seq, const KVWalk<bf16_t>& walk, const float* q, int64_t q_stride_token,
                  int64_t group, float scale, float* acc, float* m, float* l, AmxScratch<kD>& s, AttentionTiles& tiles) {
  constexpr int kZ = static_cast<int>(kD / 32);
  const int64_t heads = item.h_end - item.h_begin;
  const int64_t tokens = item.q_end - item.q_begin;
  const int64_t rows = tokens * group;      // R: query rows per kv head
  const int64_t row_stride = heads * group;  // item rows per query token
  tiles.configure(rows);
  // Item row of kv head h's tile row j: token j / group, query head h * group + j % group.
  const auto item_row = [&](int64_t h, int64_t j) { return (j / group) * row_stride + h * group + j % group; };

  s.query.resize(static_cast<size_t>(heads * kZ * 16 * rows));
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t r = item_row(h, j);
      const int64_t token = seq.token_start + item.q_begin + j / group;
      const float* src = q + token * q_stride_token + (item.h_begin * group + r % row_stride) * kD;
      for (int z = 0; z < kZ; ++z) {
        alignas(64) uint32_t pairs[16];
        _mm512_store_si512(pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 32 * z + 16),
                                                                 _mm512_loadu_ps(src + 32 * z)));
        uint32_t* dst = s.query.data() + ((h * kZ + z) * 16) * rows + j;
        for (int p = 0; p < 16; ++p) dst[p * rows] = pairs[p];
      }
      m[r] = kNegInf;
      l[r] = 0.0f;
      std::fill(acc + r * kD, acc + (r + 1) * kD, 0.0f);
    }
  }

  const __m512i key_index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(static_cast<int32_t>(rows)));
  const __m512 scale_v = _mm512_set1_ps(scale);
  alignas(64) float scores[kKeyTile];
  int64_t slots[kKeyTile];
  bool seen[kAmxRows];
  const int64_t k_bytes = walk.k_stride * static_cast<int64_t>(sizeof(bf16_t));
  for (int64_t start = item.p_begin; start < item.p_end; start += kKeyTile) {
    const int64_t n = std::min(kKeyTile, item.p_end - start);
    tile_slots(walk, start, n, slots);
    for (int64_t h = 0; h < heads; ++h) {
      const bf16_t* k_head = walk.k_base + h * walk.k_head_stride;
      const bf16_t* v_head = walk.v_base + h * walk.v_head_stride;
      // This head's value rows and the next head's key rows, asked for a head's work (a few hundred
      // cycles) before their loads: sampled, two thirds of the kernel waited on those first touches.
      // 1.21-1.42x a layer at batch 16-64 on the Intel VM, beside a whole-tile prefetch that GCC 12
      // compiled out for that CPU too (see prefetch_line; checked with -march=sapphirerapids).
      for (int64_t j = 0; j < n; ++j) {
        const char* v_row = reinterpret_cast<const char*>(v_head + slots[j] * walk.v_stride);
        for (int64_t c = 0; c < kD * 2 / 64; ++c) _mm_prefetch(v_row + 64 * c, _MM_HINT_T0);
        if (h + 1 < heads) {
          const char* k_row = reinterpret_cast<const char*>(k_head + walk.k_head_stride + slots[j] * walk.k_stride);
          for (int64_t c = 0; c < kD * 2 / 64; ++c) _mm_prefetch(k_row + 64 * c, _MM_HINT_T0);
        }
      }
      // Scores, 16 keys at a time: straight from the cache when they are 16 consecutive slots.
      for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t count = std::min<int64_t>(16, n - j0);
        const bf16_t* base = k_head + slots[j0] * walk.k_stride;
        int64_t stride = k_bytes;
        if (count < 16 || slots[j0 + 15] != slots[j0] + 15) {
          for (int64_t j = 0; j < 16; ++j) {
            if (j < count)
              std::memcpy(s.keys + j * kD, k_head + slots[j0 + j] * walk.k_stride, kD * sizeof(bf16_t));
            else
              std::memset(s.keys + j * kD, 0, kD * sizeof(bf16_t));
          }
          base = s.keys;
          stride = kD * static_cast<int64_t>(sizeof(bf16_t));
        }
        _tile_zero(0);
        for (int z = 0; z < kZ; ++z) {
          _tile_loadd(1, base + 32 * z, stride);
          _tile_loadd(2, s.query.data() + ((h * kZ + z) * 16) * rows, 4 * rows);
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, s.scores + j0 * rows, 4 * rows);
      }
      // The online softmax per query row; its weights become row j of P.
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t r = item_row(h, j);
        const int64_t visible_end = seq.num_computed + item.q_begin + j / group + 1;  // causal limit
        const int64_t visible = std::min(n, visible_end - start);
        seen[j] = visible > 0;
        __m512i* p_row = reinterpret_cast<__m512i*>(s.weights + j * kKeyTile);
        if (!seen[j]) {
          _mm512_store_si512(p_row, _mm512_setzero_si512());
          continue;
        }
        const __m512i index = _mm512_add_epi32(key_index, _mm512_set1_epi32(static_cast<int32_t>(j)));
        _mm512_store_ps(scores, _mm512_mul_ps(_mm512_i32gather_ps(index, s.scores, 4), scale_v));
        if (visible > 16)
          _mm512_store_ps(scores + 16, _mm512_mul_ps(_mm512_i32gather_ps(index, s.scores + 16 * rows, 4), scale_v));
        online_softmax_tile(scores, visible, m[r], l[r], acc + r * kD, kD);
        _mm512_store_si512(p_row, (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(scores + 16), _mm512_load_ps(scores)));
      }
      // V as pairs of keys (keys past n are zeros: their weights are 0, and 0 x NaN would not be).
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t a = 2 * p, b = 2 * p + 1;
        for (int z = 0; z < kZ; ++z) {
          const __m512i va = a < n ? _mm512_loadu_si512(v_head + slots[a] * walk.v_stride + 32 * z) : _mm512_setzero_si512();
          const __m512i vb = b < n ? _mm512_loadu_si512(v_head + slots[b] * walk.v_stride + 32 * z) : _mm512_setzero_si512();
          _mm512_store_si512(s.values[z][0][p], _mm512_unpacklo_epi16(va, vb));
          _mm512_store_si512(s.values[z][1][p], _mm512_unpackhi_epi16(va, vb));
        }
      }
      _tile_loadd(3, s.weights, kKeyTile * static_cast<int64_t>(sizeof(bf16_t)));
      for (int z = 0; z < kZ; ++z) {
        for (int half = 0; half < 2; ++half) {
          _tile_zero(5);
          _tile_loadd(4, s.values[z][half], 64);
          _tile_dpbf16ps(5, 3, 4);
          _tile_stored(5, s.out + 32 * z + 16 * half, kD * static_cast<int64_t>(sizeof(float)));
        }
      }
      for (int64_t j = 0; j < rows; ++j) {
        if (!seen[j]) continue;
        float* acc_row = acc + item_row(h, j) * kD;
        const float* o = s.out + j * kD;
        for (int z = 0; z < kZ; ++z)
          add_unpacked(acc_row + 32 * z, _mm512_load_ps(o + 32 * z), _mm512_load_ps(o + 32 * z + 16));
      }
    }
  }
}
#endif
#else
template <int64_t kD>
constexpr bool kBF16Tiles = false;
#endif

/* An item's rows, normalised, into the output: for items that are their group's only partition. */
void write_rows(const Item& item, const Seq& seq, int64_t group, int64_t num_heads, int64_t head_dim,
                const float* acc, const float* l, float* out) {
  const int64_t row_stride = (item.h_end - item.h_begin) * group;
  const int64_t num_rows = (item.q_end - item.q_begin) * row_stride;
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t token = seq.token_start + item.q_begin + r / row_stride;
    float* dst = out + (token * num_heads + item.h_begin * group + r % row_stride) * head_dim;
    const float inv = 1.0f / l[r];  // > 0: every row sees position 0, which is in its only partition
    const float* src = acc + r * head_dim;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) dst[d] = src[d] * inv;
  }
}

/* The items of the batch, in (request, query tile, kv heads, partition) order, and the groups of
 * those with several partitions (num_rows: their partial rows; max_rows: the most rows of an item).
 *
 * An item takes as many kv heads as fit in kMaxRows query rows (every kv head of a decode, for the
 * models kvos serves): a slot's heads lie side by side in the cache, so the item reads each slot's
 * K and V rows whole, in the order they lie, instead of one head's slice of every slot, with the
 * other heads' items reading the rest later. It keeps one head per item when the batch has fewer
 * than 4 (request, query tile, partition) units per thread, so a small batch still spreads over
 * every thread. */
void plan_items(const std::vector<Seq>& seqs, int64_t num_kv_heads, int64_t group, std::vector<Item>& items,
                std::vector<Group>& groups, int64_t& num_rows, int64_t& max_rows) {
  int64_t units = 0;
  for (const Seq& seq : seqs) {
    for (int64_t q_begin = 0; q_begin < seq.num_tokens; q_begin += kQueryTile) {
      const int64_t context = seq.num_computed + std::min(seq.num_tokens, q_begin + kQueryTile);
      units += (context + kPartition - 1) / kPartition;
    }
  }
  const bool share_heads = units >= 4 * static_cast<int64_t>(at::get_num_threads());
  num_rows = 0;
  max_rows = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s) {
    const Seq& seq = seqs[s];
    for (int64_t q_begin = 0; q_begin < seq.num_tokens; q_begin += kQueryTile) {
      const int64_t q_end = std::min(seq.num_tokens, q_begin + kQueryTile);
      const int64_t tokens = q_end - q_begin;
      const int64_t step = share_heads ? std::clamp<int64_t>(kMaxRows / (tokens * group), 1, num_kv_heads) : 1;
      const int64_t context = seq.num_computed + q_end;  // what the tile's last token sees
      for (int64_t h = 0; h < num_kv_heads; h += step) {
        const int64_t h_end = std::min(num_kv_heads, h + step);
        const int64_t rows = tokens * (h_end - h) * group;
        max_rows = std::max(max_rows, rows);
        if (context <= kPartition) {  // one partition: its rows go straight to the output
          items.push_back({s, h, h_end, q_begin, q_end, 0, context, -1});
          continue;
        }
        const int64_t first = static_cast<int64_t>(items.size());
        for (int64_t p_begin = 0; p_begin < context; p_begin += kPartition) {
          items.push_back({s, h, h_end, q_begin, q_end, p_begin, std::min(context, p_begin + kPartition), num_rows});
          num_rows += rows;
        }
        groups.push_back({first, static_cast<int64_t>(items.size()) - first});
      }
    }
  }
}

template <typename scalar_t, int64_t kD>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const std::vector<Seq>& seqs, int64_t block_size,
                          double scale, at::Tensor& out) {
  const int64_t num_heads = q.size(1);
  const int64_t head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1);
  const int64_t group = num_heads / num_kv_heads;

  std::vector<Item> items;
  std::vector<Group> groups;
  int64_t num_rows = 0;
  int64_t max_rows = 0;
  plan_items(seqs, num_kv_heads, group, items, groups, num_rows, max_rows);
  // Partial results of every item: acc (num_rows, D), then m and l (num_rows each).
  std::unique_ptr<float[]> partial(new float[static_cast<size_t>(num_rows) * (head_dim + 2)]);
  float* acc_all = partial.get();
  float* m_all = acc_all + num_rows * head_dim;
  float* l_all = m_all + num_rows;

  const float* q_data = q.data_ptr<float>();
  const int64_t q_stride_token = q.stride(0);
  const scalar_t* k_data = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_data = v_cache.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);

  float* out_data = out.data_ptr<float>();
#if defined(KVOS_AMX)
  const bool amx = std::is_same_v<scalar_t, bf16_t> && kBF16Tiles<kD> && kvos::amx_usable();
#endif
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    // Scratch of this thread: scaled queries, widened K/V tiles, and the rows of a one-partition item.
    std::vector<float> scratch(max_rows * head_dim + 2 * kKeyTile * head_dim + max_rows * (head_dim + 2));
    float* q_buf = scratch.data();
    float* k_buf = q_buf + max_rows * head_dim;
    float* v_buf = k_buf + kKeyTile * head_dim;
    float* acc_own = v_buf + kKeyTile * head_dim;
    float* m_own = acc_own + max_rows * head_dim;
    float* l_own = m_own + max_rows;
#if defined(KVOS_AMX)
    std::unique_ptr<AmxScratch<std::max<int64_t>(kD, 32)>> amx_scratch;
    std::optional<AttentionTiles> tile_use;  // declared last: gives the tile unit back first
#endif
    const auto walk_of = [&](const Item& item) {
      return KVWalk<scalar_t>{k_data + item.h_begin * k_cache.stride(1),
                              v_data + item.h_begin * v_cache.stride(1),
                              k_cache.stride(0),
                              v_cache.stride(0),
                              k_cache.stride(1),
                              v_cache.stride(1),
                              tables + item.seq * table_stride,
                              block_size};
    };
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      const KVWalk<scalar_t> walk = walk_of(item);
      const bool direct = item.row < 0;
      float* acc = direct ? acc_own : acc_all + item.row * head_dim;
      float* m = direct ? m_own : m_all + item.row;
      float* l = direct ? l_own : l_all + item.row;
#if defined(KVOS_AMX)
      if constexpr (std::is_same_v<scalar_t, bf16_t> && kBF16Tiles<kD>) {
        if (amx && (item.q_end - item.q_begin) * group <= kAmxRows) {
          if (!tile_use) {
            tile_use.emplace();
            amx_scratch = std::make_unique<AmxScratch<kD>>();
          }
          run_item_amx<kD>(item, seqs[item.seq], walk, q_data, q_stride_token, group, static_cast<float>(scale), acc, m,
                           l, *amx_scratch, *tile_use);
          if (direct) write_rows(item, seqs[item.seq], group, num_heads, head_dim, acc, l, out_data);
          continue;
        }
      }
#endif
      Lookahead<scalar_t> next;  // this thread's next item's first tile, asked for during this item's last
      if (i + 1 < end) {
        const Item& following = items[i + 1];
        next.aim(walk_of(following), following.h_end - following.h_begin, following.p_begin, following.p_end);
      }
#if defined(__AVX512F__) && defined(__AVX512BF16__)
      if constexpr (std::is_same_v<scalar_t, bf16_t> && kBF16Tiles<kD>) {
        if (group <= 8) {
          run_item_bf16<kD>(item, seqs[item.seq], walk, q_data, q_stride_token, group, static_cast<float>(scale), acc,
                            m, l, &next);
          if (direct) write_rows(item, seqs[item.seq], group, num_heads, head_dim, acc, l, out_data);
          continue;
        }
      }
#endif
      run_item<scalar_t, kD>(item, seqs[item.seq], walk, q_data, q_stride_token, group, head_dim,
                             static_cast<float>(scale), acc, m, l, q_buf, k_buf, v_buf, &next);
      if (direct) write_rows(item, seqs[item.seq], group, num_heads, head_dim, acc, l, out_data);
    }
  });

  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const Item& head_item = items[groups[g].first];
      const Seq& seq = seqs[head_item.seq];
      const int64_t row_stride = (head_item.h_end - head_item.h_begin) * group;
      const int64_t rows = (head_item.q_end - head_item.q_begin) * row_stride;
      for (int64_t r = 0; r < rows; ++r) {
        float m_max = kNegInf;
        for (int64_t k = 0; k < groups[g].count; ++k) m_max = std::max(m_max, m_all[items[groups[g].first + k].row + r]);
        const int64_t token = seq.token_start + head_item.q_begin + r / row_stride;
        float* dst = out_data + (token * num_heads + head_item.h_begin * group + r % row_stride) * head_dim;
        std::fill(dst, dst + head_dim, 0.0f);
        float total = 0.0f;
        for (int64_t k = 0; k < groups[g].count; ++k) {
          const int64_t row = items[groups[g].first + k].row + r;
          if (l_all[row] == 0.0f) continue;  // a partition this row cannot see
          const float weight = exp_nonpositive(m_all[row] - m_max);
          total += l_all[row] * weight;
          axpy(dst, weight, acc_all + row * head_dim, head_dim);
        }
        const float inv = 1.0f / total;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) dst[d] *= inv;
      }
    }
  });
}

template <typename scalar_t>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const std::vector<Seq>& seqs, int64_t block_size, double scale,
                       at::Tensor& out) {
  switch (q.size(2)) {
    case 64:
      return paged_attention_impl<scalar_t, 64>(q, k_cache, v_cache, block_tables, seqs, block_size, scale, out);
    case 128:
      return paged_attention_impl<scalar_t, 128>(q, k_cache, v_cache, block_tables, seqs, block_size, scale, out);
    default:
      return paged_attention_impl<scalar_t, 0>(q, k_cache, v_cache, block_tables, seqs, block_size, scale, out);
  }
}

/*
 * q: (T, H, D) float32, any token stride.      k_cache, v_cache: (num_slots, KV, D) float32 or bfloat16.
 * block_tables: (S, max_blocks) int32.   seqs: (S, 3) int64 rows of (token_start, num_tokens, num_computed).
 * Returns (T, H, D) float32; rows no request covers are 0.
 */
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seqs, int64_t block_size, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1 && q.stride(1) == q.size(2),
                    "paged_attention: q must be float32 (tokens, heads, head_dim), each token's heads contiguous");
  TORCH_CHECK_VALUE(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
                    "paged_attention: k_cache and v_cache must both be (num_slots, kv_heads, head_dim)");
  TORCH_CHECK_VALUE(k_cache.scalar_type() == v_cache.scalar_type() &&
                        (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
                    "paged_attention: caches must both be float32 or both bfloat16, got ", k_cache.scalar_type(),
                    " and ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
                    "paged_attention: the caches' head_dim must be contiguous");
  TORCH_CHECK_VALUE(k_cache.size(2) == q.size(2), "paged_attention: q has head_dim ", q.size(2), ", the cache ",
                    k_cache.size(2));
  TORCH_CHECK_VALUE(q.size(1) % k_cache.size(1) == 0, "paged_attention: ", q.size(1),
                    " query heads cannot be grouped over ", k_cache.size(1), " kv heads");
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
                    "paged_attention: block_tables must be an int32 (requests, max_blocks) tensor, rows contiguous");
  TORCH_CHECK_VALUE(seqs.dim() == 2 && seqs.size(1) == 3 && seqs.scalar_type() == at::kLong &&
                        seqs.size(0) == block_tables.size(0),
                    "paged_attention: seqs must be int64 (requests, 3), one row per block table");
  TORCH_CHECK_VALUE(block_size >= 1, "paged_attention: block_size must be >= 1, got ", block_size);

  const int64_t num_tokens = q.size(0);
  const int64_t num_slots = k_cache.size(0);
  const at::Tensor seqs_c = seqs.contiguous();
  const int64_t* seq_data = seqs_c.data_ptr<int64_t>();
  std::vector<Seq> batch(seqs.size(0));
  for (int64_t s = 0; s < seqs.size(0); ++s) {
    Seq seq{seq_data[3 * s], seq_data[3 * s + 1], seq_data[3 * s + 2]};
    TORCH_CHECK_VALUE(seq.num_tokens >= 1 && seq.num_computed >= 0 && seq.token_start >= 0 &&
                          seq.token_start + seq.num_tokens <= num_tokens,
                      "paged_attention: request ", s, " has query rows [", seq.token_start, ", ",
                      seq.token_start + seq.num_tokens, ") outside the batch of ", num_tokens, " tokens");
    // Every block the request reads must lie inside the cache: one check per block, not per key.
    const int64_t num_blocks = (seq.num_computed + seq.num_tokens + block_size - 1) / block_size;
    TORCH_CHECK_VALUE(num_blocks <= block_tables.size(1), "paged_attention: request ", s, " needs ", num_blocks,
                      " blocks, its table has ", block_tables.size(1));
    const int32_t* table = block_tables.data_ptr<int32_t>() + s * block_tables.stride(0);
    for (int64_t b = 0; b < num_blocks; ++b) {
      TORCH_CHECK_VALUE(table[b] >= 0 && (static_cast<int64_t>(table[b]) + 1) * block_size <= num_slots,
                        "paged_attention: request ", s, " block ", b, " is block id ", table[b],
                        ", outside a cache of ", num_slots / block_size, " blocks of ", block_size);
    }
    batch[s] = seq;
  }

  at::Tensor out = at::zeros({num_tokens, q.size(1), q.size(2)}, q.options());
  if (k_cache.scalar_type() == at::kFloat) {
    dispatch_head_dim<float>(q, k_cache, v_cache, block_tables, batch, block_size, scale, out);
  } else {
    dispatch_head_dim<c10::BFloat16>(q, k_cache, v_cache, block_tables, batch, block_size, scale, out);
  }
  return out;
}

/* One row of head_dim values into the cache's dtype: a copy, a widening, or a rounding to nearest even
 * (what `Tensor.to(torch.bfloat16)` does). */
inline void store_row(float* __restrict dst, const float* __restrict src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
inline void store_row(c10::BFloat16* __restrict dst, const c10::BFloat16* __restrict src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(c10::BFloat16));
}
inline void store_row(float* __restrict dst, const c10::BFloat16* __restrict src, int64_t n) { widen(dst, src, n); }
inline void store_row(c10::BFloat16* __restrict dst, const float* __restrict src, int64_t n) {
  uint16_t* raw = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) raw[d] = kvos::float_to_bf16_bits(src[d]);
}

template <typename cache_t, typename src_t>
void write_rows(at::Tensor& cache, const at::Tensor& rows, const int64_t* slots) {
  const int64_t num_tokens = rows.size(0), num_heads = rows.size(1), head_dim = rows.size(2);
  cache_t* base = cache.data_ptr<cache_t>();
  const src_t* src = rows.data_ptr<src_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t h = 0; h < num_heads; ++h) {
      store_row(base + slots[t] * cache.stride(0) + h * cache.stride(1), src + t * rows.stride(0) + h * rows.stride(1),
                head_dim);
    }
  }
}

template <typename cache_t>
void write_rows_from(at::Tensor& cache, const at::Tensor& rows, const int64_t* slots) {
  if (rows.scalar_type() == at::kFloat) {
    write_rows<cache_t, float>(cache, rows, slots);
  } else {
    write_rows<cache_t, c10::BFloat16>(cache, rows, slots);
  }
}

/*
 * The step's new keys and values into the cache: k_cache[slot_mapping[t]] = k[t] (and v), in the cache's
 * dtype. What `cache[slot_mapping] = k.to(cache.dtype)` does, in one pass with no index kernel per call.
 * k, v: (T, KV, D) float32 or bfloat16, any token and head strides, head_dim contiguous.
 */
void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping, const at::Tensor& k,
              const at::Tensor& v) {
  TORCH_CHECK_VALUE(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() &&
                        k_cache.scalar_type() == v_cache.scalar_type() &&
                        (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                        k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
                    "write_kv: caches must both be float32 or both bfloat16 (num_slots, kv_heads, head_dim), "
                    "head_dim contiguous");
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == at::kLong,
                    "write_kv: slot_mapping must be a 1-d int64 tensor");
  for (const at::Tensor* rows : {&k, &v}) {
    TORCH_CHECK_VALUE(rows->dim() == 3 && rows->size(0) == slot_mapping.size(0) &&
                          rows->size(1) == k_cache.size(1) && rows->size(2) == k_cache.size(2) &&
                          rows->stride(2) == 1 &&
                          (rows->scalar_type() == at::kFloat || rows->scalar_type() == at::kBFloat16),
                      "write_kv: k and v must be float32 or bfloat16 (", slot_mapping.size(0), ", ",
                      k_cache.size(1), ", ", k_cache.size(2), "), head_dim contiguous; got ", rows->sizes());
  }
  const at::Tensor slots_c = slot_mapping.contiguous();
  const int64_t* slots = slots_c.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots_c.size(0); ++t) {
    TORCH_CHECK_INDEX(slots[t] >= 0 && slots[t] < k_cache.size(0), "write_kv: token ", t, "'s slot ", slots[t],
                      " is outside a cache of ", k_cache.size(0), " slots");
  }
  for (auto [cache, rows] : {std::pair<at::Tensor*, const at::Tensor*>{&k_cache, &k}, {&v_cache, &v}}) {
    if (cache->scalar_type() == at::kFloat) {
      write_rows_from<float>(*cache, *rows, slots);
    } else {
      write_rows_from<c10::BFloat16>(*cache, *rows, slots);
    }
  }
}

/* Whether bfloat16 items run on the tile unit (AMX) in this process. */
bool paged_attention_amx() { return kvos::amx_usable(); }

}  // namespace

TORCH_LIBRARY(kvos, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seqs, "
      "int block_size, float scale) -> Tensor");
  m.def("paged_attention_amx() -> bool", &paged_attention_amx);
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor k, Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(kvos, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_kv", &write_kv);
}
