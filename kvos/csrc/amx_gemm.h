/*
 * A bfloat16 GEMM on the AMX tile unit for the row counts of a decode step, shared by kvos's
 * bfloat16 linears (kvos/model/csrc/amx_linear.cpp) and its int4 linears at larger batches
 * (kvos/model/csrc/int4_linear.cpp): the two differ only in where a column tile's weights come from.
 *
 * y (M x N) = x (M x K) . W^T (+ bias), every sum in float32, y rounded to bfloat16 once.
 * TDPBF16PS multiplies a (16 x 32) bfloat16 tile by a (32 x 16) one into a 16 x 16 float32 tile; its
 * right operand holds pairs of consecutive k for each column (dword p of row j = W[n0 + j][2p .. 2p+1]
 * sits at row p, column j). A column tile's weights in that layout are K / 2 rows of 16 dwords, and
 * its B tile for k step s (16 k pairs, 1 KiB) starts at dword 256 s.
 *
 * The output is computed in 32 x 32 blocks (`column_pair`): four C tiles, two A tiles (rows 0-15 and
 * 16-31 of the block) and two B tiles (the block's two column tiles), each loaded tile feeding two
 * products. Each thread takes a run of column pairs in groups whose weights stay in L2 while every
 * 32-row block of x passes over them. The next k step's B tiles (2 KiB) are prefetched into L1 while
 * this step's products run: 1.18-1.33x on SmolLM2's bfloat16 linears at 1 to 128 rows, 1.03x at 256
 * (BENCHMARKS.md, session 16). The last M % 16 rows are copied into a zeroed 16-row block first, so
 * every tile is 16 rows and no load reads past x.
 *
 * Tiles: 0-3 C, 4-5 A, 6-7 B, all 16 rows of 64 bytes.
 */
#pragma once

#include "amx_tiles.h"

#if defined(KVOS_AMX)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace kvos {

/* Every tile 16 rows of 64 bytes. */
inline TileConfig gemm_tiles() {
  TileConfig config;
  for (int tile = 0; tile < 8; ++tile) config.set(tile, 16, 64);
  return config;
}

/* `rows` rows of a stored 16 x 16 float32 tile, plus the bias's 16 columns (if any), into y rounded to
 * bfloat16 (oneDNN's fused bias: added in float32, rounded once). */
inline void store_rows(const float* c, int64_t rows, const float* bias, c10::BFloat16* y, int64_t ldy) {
  const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(bias);
  for (int64_t r = 0; r < rows; ++r) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(c + 16 * r), b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy), (__m256i)v);
  }
}

/* Columns [n0, n0 + 32) of y for 16 (`pair` false) or 32 rows of x (x padded to whole tiles):
 * C tiles 0, 1 (rows 0-15 x the two column tiles) and 2, 3 (rows 16-31); A tiles 4, 5; B tiles 6, 7.
 * Each tile register is loaded once per 32 k and feeds two products: a tile register is not
 * renamed, so reloading the one a product still reads would wait for it. */
inline void column_pair(const c10::BFloat16* a0, int64_t a0_stride, const c10::BFloat16* a1, int64_t a1_stride,
                        const uint32_t* b0, const uint32_t* b1, int64_t k_steps, bool pair, int64_t rows,
                        const float* bias, c10::BFloat16* y, int64_t ldy) {
  _tile_zero(0);
  _tile_zero(1);
  if (pair) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < k_steps; ++s) {
    if (s + 1 < k_steps) {  // the next step's weights: the hardware prefetchers leave tile loads waiting
      const char* next0 = reinterpret_cast<const char*>(b0 + (s + 1) * 256);
      const char* next1 = reinterpret_cast<const char*>(b1 + (s + 1) * 256);
      for (int line = 0; line < 16; ++line) {
        _mm_prefetch(next0 + 64 * line, _MM_HINT_T0);
        _mm_prefetch(next1 + 64 * line, _MM_HINT_T0);
      }
    }
    _tile_loadd(4, a0 + 32 * s, a0_stride);
    _tile_loadd(6, b0 + s * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1 + s * 256, 64);
    _tile_dpbf16ps(1, 4, 7);
    if (pair) {
      _tile_loadd(5, a1 + 32 * s, a1_stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float c[16 * 16];
  const int64_t top = std::min<int64_t>(16, rows);
  _tile_stored(0, c, 64);
  store_rows(c, top, bias, y, ldy);
  _tile_stored(1, c, 64);
  store_rows(c, top, bias == nullptr ? nullptr : bias + 16, y + 16, ldy);
  if (pair && rows > 16) {
    _tile_stored(2, c, 64);
    store_rows(c, rows - 16, bias, y + 16 * ldy, ldy);
    _tile_stored(3, c, 64);
    store_rows(c, rows - 16, bias == nullptr ? nullptr : bias + 16, y + 16 * ldy + 16, ldy);
  }
}

/* y = x W^T (+ bias) for x bfloat16 (M x K, rows contiguous), y bfloat16 (M x 32 n_pairs). Each thread
 * takes column pairs in groups of `group`; `weights(begin, end)`, called on that thread, returns the
 * group's weights in the tile layout, pair after pair, each pair its two column tiles back to back
 * (K / 2 x 16 dwords each). It runs before the group's first product, so it may fill a per-thread
 * buffer. */
template <typename Weights>
void tile_gemm(const at::Tensor& x, int64_t n_pairs, int64_t group, const float* bias, at::Tensor& y,
               const Weights& weights) {
  const int64_t m = x.size(0), k = x.size(1);
  if (m == 0) return;
  const c10::BFloat16* x_data = x.data_ptr<c10::BFloat16>();
  const int64_t ldx = x.stride(0);
  // A tile always loads 16 rows: the last m % 16 rows of x are copied into a zeroed 16-row block, so no
  // load reads past x (the padding rows' products land in rows that are not stored).
  const int64_t whole = m / 16 * 16;
  at::Tensor tail;
  if (whole != m) {
    tail = at::zeros({16, k}, x.options());
    tail.narrow(0, 0, m - whole).copy_(x.narrow(0, whole, m - whole));
  }
  const c10::BFloat16* tail_data = whole != m ? tail.data_ptr<c10::BFloat16>() : nullptr;
  const auto rows_at = [&](int64_t row, const c10::BFloat16*& ptr, int64_t& stride) {
    if (row < whole) {
      ptr = x_data + row * ldx;
      stride = ldx * 2;
    } else {
      ptr = tail_data;
      stride = k * 2;
    }
  };
  c10::BFloat16* y_data = y.data_ptr<c10::BFloat16>();
  const int64_t ldy = y.stride(0), k_steps = k / 32, tile_words = (k / 2) * 16;
  at::parallel_for(0, n_pairs, 2, [&](int64_t begin, int64_t end) {
    TileUse tiles;
    tiles.load(gemm_tiles());
    for (int64_t g = begin; g < end; g += group) {
      const int64_t g_end = std::min(end, g + group);
      const uint32_t* b_group = weights(g, g_end);
      for (int64_t m0 = 0; m0 < m; m0 += 32) {
        const int64_t rows = std::min<int64_t>(32, m - m0);
        const c10::BFloat16 *a0, *a1 = nullptr;
        int64_t s0, s1 = 0;
        rows_at(m0, a0, s0);
        if (rows > 16) rows_at(m0 + 16, a1, s1);
        for (int64_t np = g; np < g_end; ++np) {
          const uint32_t* b0 = b_group + 2 * (np - g) * tile_words;
          column_pair(a0, s0, a1, s1, b0, b0 + tile_words, k_steps, rows > 16, rows,
                      bias == nullptr ? nullptr : bias + 32 * np, y_data + m0 * ldy + 32 * np, ldy);
        }
      }
    }
  });
}

}  // namespace kvos

#endif
