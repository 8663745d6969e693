/*
 * bfloat16 linears on the AMX tile unit for the row counts of a decode step.
 *
 * y (M x N) = x (M x K) . W^T (+ bias), W (N x K) bfloat16, every sum in float32, y rounded to
 * bfloat16 once. TDPBF16PS multiplies a (16 x 32) bfloat16 tile by a (32 x 16) one into a 16 x 16
 * float32 tile; its right operand must hold pairs of consecutive k for each column (dword p of row
 * j = W[n0 + j][2p .. 2p+1] sits at row p, column j). `pack` lays W out that way once, at start-up:
 *
 *     packed[n_tile][k_pair][16 columns][2]      (N / 16 tiles of K / 2 rows of 64 bytes)
 *
 * so a column tile's whole K is one contiguous run that the hardware prefetcher streams, and a B
 * tile (16 k pairs) is 1 KiB. The output is computed in 32 x 32 blocks (`column_pair`): four C
 * tiles, two A tiles (rows 0-15 and 16-31 of the block) and two B tiles (the two column tiles),
 * each loaded tile feeding two products. Each thread takes a run of column pairs, in groups of 8
 * whose weights (8 x 2 x K x 32 bytes) stay in L2 while every 32-row block of x passes over them,
 * so W comes from memory once per call whatever M is. The last M % 16 rows are copied into a
 * zeroed 16-row block first, so every tile is 16 rows and no load reads past x.
 *
 * Tiles: 0-3 C, 4-5 A, 6-7 B, all 16 rows of 64 bytes.
 */

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "amx_tiles.h"

namespace {

#if defined(KVOS_AMX)
constexpr int64_t kGroup = 8;  // column pairs per pass of x

/* Every tile 16 rows of 64 bytes. */
kvos::TileConfig linear_tiles() {
  kvos::TileConfig config;
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
void column_pair(const c10::BFloat16* a0, int64_t a0_stride, const c10::BFloat16* a1, int64_t a1_stride,
                 const uint32_t* b0, const uint32_t* b1, int64_t k_steps, bool pair, int64_t rows,
                 const float* bias, c10::BFloat16* y, int64_t ldy) {
  _tile_zero(0);
  _tile_zero(1);
  if (pair) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < k_steps; ++s) {
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
#endif

at::Tensor amx_pack(const at::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
                    "amx_pack: weight must be a bfloat16 (out_features, in_features) matrix");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK_VALUE(n % 32 == 0 && k % 32 == 0, "amx_pack: needs out_features and in_features multiples of 32, got ",
                    n, " x ", k);
  const at::Tensor w = weight.contiguous();
  // [n_tile][k_pair][column][2]: element (j, 2p + e) of tile t at ((t * K/2 + p) * 16 + j) * 2 + e.
  return w.view({n / 16, 16, k / 2, 2}).permute({0, 2, 1, 3}).contiguous().view({n / 16, k / 2 * 32});
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
                    "amx_linear: x must be bfloat16 (rows, in_features), rows contiguous");
  TORCH_CHECK_VALUE(packed.dim() == 2 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                        packed.size(1) == x.size(1) * 16,
                    "amx_linear: packed must come from amx_pack of an (out_features, ", x.size(1), ") weight");
  TORCH_CHECK_VALUE(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == packed.size(0) * 16),
                    "amx_linear: bias must be (out_features,)");
#if defined(KVOS_AMX)
  TORCH_CHECK(kvos::amx_usable(), "amx_linear: this process has no AMX tile state");
  const int64_t m = x.size(0), k = x.size(1), n_tiles = packed.size(0);
  at::Tensor y = at::empty({m, n_tiles * 16}, x.options());
  if (m == 0) return y;
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_data = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
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
  const uint32_t* b_data = reinterpret_cast<const uint32_t*>(packed.data_ptr<c10::BFloat16>());
  c10::BFloat16* y_data = y.data_ptr<c10::BFloat16>();
  const int64_t ldy = y.stride(0), k_steps = k / 32, tile_words = (k / 2) * 16;
  at::parallel_for(0, n_tiles / 2, 2, [&](int64_t begin, int64_t end) {
    kvos::TileUse tiles;
    tiles.load(linear_tiles());
    // Groups of column pairs whose weights (8 x 2 x K x 32 bytes) stay in L2 while every 32-row block
    // of x (in L1) passes over them: the weights come from memory once, x's blocks from L1.
    for (int64_t g = begin; g < end; g += kGroup) {
      const int64_t g_end = std::min(end, g + kGroup);
      for (int64_t m0 = 0; m0 < m; m0 += 32) {
        const int64_t rows = std::min<int64_t>(32, m - m0);
        const c10::BFloat16 *a0, *a1 = nullptr;
        int64_t s0, s1 = 0;
        rows_at(m0, a0, s0);
        if (rows > 16) rows_at(m0 + 16, a1, s1);
        for (int64_t np = g; np < g_end; ++np) {
          const uint32_t* b0 = b_data + 2 * np * tile_words;
          column_pair(a0, s0, a1, s1, b0, b0 + tile_words, k_steps, rows > 16, rows,
                      bias_data == nullptr ? nullptr : bias_data + 32 * np, y_data + m0 * ldy + 32 * np, ldy);
        }
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "amx_linear: built without AMX");
#endif
}

}  // namespace

TORCH_LIBRARY(kvos_amx, m) {
  m.def("available() -> bool", &kvos::amx_usable);
  m.def("pack(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvos_amx, CPU, m) {
  m.impl("pack", &amx_pack);
  m.impl("linear", &amx_linear);
}
