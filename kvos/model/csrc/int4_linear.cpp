/*
 * int4 weights times a few activation rows on AVX512-VNNI: y = x W^T for 1 to ~12 rows of x.
 *
 * Decode at small batches reads every weight once per step and does little with it, so the
 * step is as fast as the weights stream from memory. The weights are GGUF Q4_1's groups of 32
 * inputs, w = d q + m with q in 0..15 and one (d, m) per group, so for one group
 *
 *     sum_i x_i w_i = d sum_i x_i q_i + m sum_i x_i
 *
 * Each activation row is quantized per group of 32 to int8 (x_i ~ dx xq_i, dx = max|x| / 127,
 * as llama.cpp's Q8 activations are), which turns sum_i x_i q_i into an integer dot product
 * that `vpdpbusd` does 64 products at a time: unsigned 4-bit codes times signed 8-bit
 * activations, 4 adjacent products summed into each 32-bit lane. The second term uses the
 * group's exact sum of x.
 *
 * Layout (packed once, at load, by kvos/model/int4_kernel.py): output rows go in blocks of 16,
 * one per 32-bit lane, so the 16 rows' sums come out as one vector and no lane is ever summed
 * horizontally. For row block r and group g, 320 contiguous bytes:
 *
 *     bytes   0..255   4 chunks t of 64 bytes; in chunk t, lane l (bytes 4l..4l+3) holds row 16r+l's
 *                      codes 8t+j in the low nibbles and 8t+4+j in the high ones (j = 0..3)
 *     bytes 256..287   the 16 rows' d, float16
 *     bytes 288..319   the 16 rows' m, float16
 *
 * A chunk's low nibbles meet the activation's int8 codes 8t..8t+3 (one 32-bit broadcast), its
 * high nibbles codes 8t+4..8t+7. A row block's groups lie one after another, so each thread
 * streams its share of the rows from memory in order.
 *
 * Above a few activation rows the integer products cost more than the weights' bytes save. On CPUs
 * with AMX, `int4_linear_amx` then dequantizes each pair of row blocks (32 outputs, all groups) to
 * bfloat16 once per call, into a per-thread buffer in the tile layout of kvos/csrc/amx_gemm.h (a
 * group's 16 x 32 weights are exactly one B tile), and multiplies every activation row by it on the
 * tile unit, activations unrounded: w = d q + m rounded to bfloat16, the weights a bfloat16 GEMM on
 * the dequantized layer would multiply by.
 */

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_gemm.h"

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kLanes = 16;
constexpr int64_t kCodeBytes = kLanes * kGroup / 2;
constexpr int64_t kBlockBytes = kCodeBytes + 2 * kLanes * 2;
constexpr int kMaxTile = 4;

/* The activation rows, quantized: per row its int8 codes in input order, and per group its scale and
 * exact sum. One allocation for all of them: a call at batch 1 takes a few microseconds. */
struct QuantizedRows {
  int64_t k, groups;
  std::vector<int8_t> codes;
  std::vector<float> scale_and_sum;
  const int8_t* row_codes(int64_t m) const { return codes.data() + m * k; }
  const float* row_scale(int64_t m) const { return scale_and_sum.data() + 2 * m * groups; }
  const float* row_sum(int64_t m) const { return row_scale(m) + groups; }
};

inline __m512 load_bf16x16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

QuantizedRows quantize_rows(const c10::BFloat16* x, int64_t rows, int64_t k) {
  const int64_t groups = k / kGroup;
  QuantizedRows q{k, groups, std::vector<int8_t>(rows * k), std::vector<float>(2 * rows * groups)};
  for (int64_t m = 0; m < rows; ++m) {
    float* scale = q.scale_and_sum.data() + 2 * m * groups;
    float* sum = scale + groups;
    for (int64_t g = 0; g < groups; ++g) {
      const c10::BFloat16* in = x + m * k + g * kGroup;
      const __m512 a = load_bf16x16(in), b = load_bf16x16(in + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      // Rounds to nearest, ties to even (the default rounding mode), then saturates to int8.
      int8_t* out = q.codes.data() + m * k + g * kGroup;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inverse))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inverse))));
      scale[g] = amax / 127.0f;
      sum[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
  }
  return q;
}

inline __m512 load_half16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

/* Asks for the group kPrefetchGroups after `block` (its 5 lines): row blocks lie one after another, so the
 * stream of groups is one long run that the hardware prefetchers alone left 1.1-1.4x slower at 1-12 rows.
 * Past the last row block the addresses are outside the weight; a prefetch never faults. */
constexpr int64_t kPrefetchGroups = 16;

inline void prefetch_ahead(const uint8_t* block) {
  const char* ahead = reinterpret_cast<const char*>(block + kPrefetchGroups * kBlockBytes);
  for (int64_t line = 0; line < kBlockBytes / 64; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
}

/* Rows [16 r, 16 r + 16) of y for `Tile` activation rows: every group's codes are unpacked once and
 * multiplied into each row. */
template <int Tile>
void row_block(const uint8_t* block, int64_t groups, const QuantizedRows& x, int64_t first, c10::BFloat16* const* y) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m512 acc[Tile];
  for (int m = 0; m < Tile; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, block += kBlockBytes) {
    prefetch_ahead(block);
    __m512i dot[Tile];
    for (int m = 0; m < Tile; ++m) dot[m] = _mm512_setzero_si512();
    for (int t = 0; t < 4; ++t) {
      const __m512i packed = _mm512_loadu_si512(block + 64 * t);
      const __m512i lo = _mm512_and_si512(packed, low_nibbles);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
      for (int m = 0; m < Tile; ++m) {
        int32_t low_codes, high_codes;
        std::memcpy(&low_codes, x.row_codes(first + m) + g * kGroup + 8 * t, 4);
        std::memcpy(&high_codes, x.row_codes(first + m) + g * kGroup + 8 * t + 4, 4);
        dot[m] = _mm512_dpbusd_epi32(dot[m], lo, _mm512_set1_epi32(low_codes));
        dot[m] = _mm512_dpbusd_epi32(dot[m], hi, _mm512_set1_epi32(high_codes));
      }
    }
    const __m512 d = load_half16(block + kCodeBytes);
    const __m512 mins = load_half16(block + kCodeBytes + 2 * kLanes);
    for (int m = 0; m < Tile; ++m) {
      const __m512 scaled = _mm512_mul_ps(d, _mm512_set1_ps(x.row_scale(first + m)[g]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), scaled, acc[m]);
      acc[m] = _mm512_fmadd_ps(mins, _mm512_set1_ps(x.row_sum(first + m)[g]), acc[m]);
    }
  }
  for (int m = 0; m < Tile; ++m) {
    alignas(64) float out[kLanes];
    _mm512_store_ps(out, acc[m]);
    for (int64_t l = 0; l < kLanes; ++l) y[m][l] = c10::BFloat16(out[l]);
  }
}

template <int Tile>
void row_block_tile(const uint8_t* block, const QuantizedRows& x, int64_t first, at::BFloat16* y, int64_t n,
                    int64_t r) {
  c10::BFloat16* out[Tile];
  for (int m = 0; m < Tile; ++m) out[m] = y + (first + m) * n + r * kLanes;
  row_block<Tile>(block, x.groups, x, first, out);
}

/* What both int4 ops need of their operands: bfloat16 rows of x, a packed weight in the layout above whose
 * groups cover x's features and whose row blocks make `out_features`. Errors name the op. */
void check_operands(const char* op, const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kBFloat16, op,
                    ": x must be a bfloat16 (rows, in_features) matrix, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == kBlockBytes &&
                        packed.is_contiguous(),
                    op, ": packed must be contiguous uint8 (row blocks, groups, ", kBlockBytes, ")");
  const int64_t k = x.size(1), groups = packed.size(1), row_blocks = packed.size(0);
  TORCH_CHECK_VALUE(k == groups * kGroup, op, ": x has ", k, " features, the weight ", groups * kGroup);
  TORCH_CHECK_VALUE(out_features == row_blocks * kLanes, op, ": out_features ", out_features,
                    " is not the packed weight's ", row_blocks * kLanes);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  check_operands("int4_linear", x, packed, out_features);
  const int64_t rows = x.size(0), k = x.size(1), groups = packed.size(1), row_blocks = packed.size(0);

  const at::Tensor xc = x.contiguous();
  const QuantizedRows quantized = quantize_rows(xc.data_ptr<at::BFloat16>(), rows, k);

  at::Tensor y = at::empty({rows, out_features}, x.options());
  at::BFloat16* y_data = y.data_ptr<at::BFloat16>();
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  at::parallel_for(0, row_blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* block = weights + r * groups * kBlockBytes;
      int64_t m = 0;
      for (; m + kMaxTile <= rows; m += kMaxTile) row_block_tile<kMaxTile>(block, quantized, m, y_data, out_features, r);
      switch (rows - m) {
        case 3: row_block_tile<3>(block, quantized, m, y_data, out_features, r); break;
        case 2: row_block_tile<2>(block, quantized, m, y_data, out_features, r); break;
        case 1: row_block_tile<1>(block, quantized, m, y_data, out_features, r); break;
        default: break;
      }
    }
  });
  return y;
}

#if defined(KVOS_AMX)
constexpr int64_t kAmxGroup = 2;  // column pairs dequantized per pass of x: 2 x 2 x K x 32 bytes of buffer

/* Row block r's weights (all its groups) as bfloat16 in the tile layout: group g is B tile g, whose row
 * p holds k = 32 g + 2p and 32 g + 2p + 1 of each of the 16 rows (columns of y). In chunk t the low
 * nibbles of bytes 0, 1 are k pair 4t, of bytes 2, 3 pair 4t + 1, and the high nibbles pairs 4t + 2
 * and 4t + 3. */
void dequantize_row_block(const uint8_t* block, int64_t groups, uint32_t* out) {
  // A code q (0..15) in mantissa bits 19-22 of 1.0 is the float 1 + q / 16, so w = d q + m is
  // fma(1 + q / 16, 16 d, m - 16 d): a shift and a bit select per code instead of a mask and an int
  // to float conversion. m - 16 d (two float16 values) is exact in float32 unless their magnitudes
  // lie more than 2^13 apart (Q4_1's m is about -8 d), so w rounds once, as fma(q, d, m) would;
  // otherwise it is one float32 rounding off, far below the bfloat16 rounding that follows.
  const __m512i code_bits = _mm512_set1_epi32(0x0F << 19);
  const __m512i one = _mm512_set1_epi32(0x3F800000);
  // After cvtne2ps_pbh(odd, even): [even 0..15, odd 0..15] -> even j and odd j side by side in dword j.
  alignas(64) static constexpr int16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                          21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                          11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  // A code's nibble at bit b of its dword, moved to bit 19, then or-ed into 1.0 (ternary-logic table
  // 0xEA: (a & b) | c).
  const auto code_as_float = [&](__m512i packed, int b) {
    const __m512i at19 = b <= 19 ? _mm512_slli_epi32(packed, 19 - b) : _mm512_srli_epi32(packed, b - 19);
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(at19, code_bits, one, 0xEA));
  };
  for (int64_t g = 0; g < groups; ++g, block += kBlockBytes, out += 256) {
    prefetch_ahead(block);
    const __m512 d16 = _mm512_mul_ps(load_half16(block + kCodeBytes), _mm512_set1_ps(16.0f));
    const __m512 base = _mm512_sub_ps(load_half16(block + kCodeBytes + 2 * kLanes), d16);
    for (int t = 0; t < 4; ++t) {
      const __m512i packed = _mm512_loadu_si512(block + 64 * t);
      for (int half = 0; half < 2; ++half) {
        for (int jp = 0; jp < 2; ++jp) {
          const int b = 4 * half + 16 * jp;
          const __m512 w_even = _mm512_fmadd_ps(code_as_float(packed, b), d16, base);
          const __m512 w_odd = _mm512_fmadd_ps(code_as_float(packed, b + 8), d16, base);
          const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(w_odd, w_even);
          _mm512_storeu_si512(out + 16 * (4 * t + 2 * half + jp), _mm512_permutexvar_epi16(interleave, pairs));
        }
      }
    }
  }
}
#endif

at::Tensor int4_linear_amx(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  check_operands("int4_linear_amx", x, packed, out_features);
  TORCH_CHECK_VALUE(packed.size(0) % 2 == 0, "int4_linear_amx: packed must have an even number of row blocks (",
                    "column pairs of 32 outputs), got ", packed.size(0));
#if defined(KVOS_AMX)
  TORCH_CHECK(kvos::amx_usable(), "int4_linear_amx: this process has no AMX tile state");
  const int64_t groups = packed.size(1), row_blocks = packed.size(0);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  const int64_t tile_words = groups * 256;
  kvos::tile_gemm(xc, row_blocks / 2, kAmxGroup, nullptr, y, [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint32_t> buffer;
    buffer.resize(2 * kAmxGroup * tile_words);
    for (int64_t r = 2 * begin; r < 2 * end; ++r) {
      dequantize_row_block(weights + r * groups * kBlockBytes, groups, buffer.data() + (r - 2 * begin) * tile_words);
    }
    return static_cast<const uint32_t*>(buffer.data());
  });
  return y;
#else
  TORCH_CHECK(false, "int4_linear_amx: built without AMX");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvos, m) {
  m.def("int4_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.def("int4_linear_amx(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.def("int4_amx_available() -> bool", &kvos::amx_usable);
}

TORCH_LIBRARY_IMPL(kvos, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_linear_amx", &int4_linear_amx);
}
