/*
 * A bfloat16 decoder layer's elementwise work on CPU, one pass over memory per call.
 *
 * In eager PyTorch a bfloat16 RMSNorm is four kernels (widen to float32, normalise,
 * round, times the weight), SwiGLU two, rotary four (two products, a roll, a sum); at
 * the row counts of a decode step each costs more in dispatch and in its own pass over
 * memory than in arithmetic (BENCHMARKS.md, round 2, session 11).
 * Each op here computes what the eager ops compute, in the same dtypes and with the
 * same roundings to bfloat16 between them:
 *
 *   rms_norm(x, w)      w * bf16(x * rsqrt(mean(x^2) + eps))      the sum in float32
 *   silu_mul(gate_up)   bf16(bf16(silu(gate)) * up)               gate | up halves of each row
 *   rotary(x, cos, sin) bf16(bf16(x * cos) + bf16(roll(x, D/2) * sin))
 *
 * Only the order of the float32 sum of squares may differ from the eager kernel's, by
 * float32 rounding; every other result is rounded to bfloat16 where the eager ops round
 * it. Loops are written for the vectoriser (-O3 -march=native, `omp simd`); rows are
 * shared over the threads when a call has enough of them.
 */

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <cmath>
#include <cstdint>

namespace {

using kvos::bf16_bits_to_float;
using kvos::float_to_bf16_bits;

constexpr int64_t kElementsPerTask = 16384;  // below this a call runs on one thread (a fork costs more)

/* A float32 result rounded to bfloat16 as an eager bfloat16 op rounds its output, kept as float32. */
inline float round_bf16(float value) { return bf16_bits_to_float(float_to_bf16_bits(value)); }

int64_t rows_per_task(int64_t row_elements) { return std::max<int64_t>(1, kElementsPerTask / row_elements); }

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>()); }
uint16_t* bits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>()); }

void check_bf16_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, op,
                    ": expects a bfloat16 (rows, features) tensor, features contiguous; got ", x.scalar_type(), " ",
                    x.sizes());
}

/* x: (rows, hidden) bfloat16, weight: (hidden,) bfloat16 -> (rows, hidden) bfloat16. */
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_bf16_rows(x, "rms_norm");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == hidden && weight.scalar_type() == at::kBFloat16 &&
                        weight.is_contiguous(),
                    "rms_norm: weight must be a contiguous bfloat16 (", hidden, ",) tensor");
  at::Tensor out = at::empty({rows, hidden}, x.options());
  const uint16_t* src = bits(x);
  const uint16_t* w = bits(weight);
  uint16_t* dst = bits(out);
  const int64_t row_stride = x.stride(0);
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, rows, rows_per_task(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* in = src + r * row_stride;
      uint16_t* o = dst + r * hidden;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < hidden; ++d) {
        const float v = bf16_bits_to_float(in[d]);
        sum += v * v;
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(hidden) + epsilon);
#pragma omp simd
      for (int64_t d = 0; d < hidden; ++d) {
        const float normed = round_bf16(bf16_bits_to_float(in[d]) * inv);
        o[d] = float_to_bf16_bits(bf16_bits_to_float(w[d]) * normed);
      }
    }
  });
  return out;
}

/* gate_up: (rows, 2 I) bfloat16, the gate in the first I columns -> (rows, I) bfloat16. */
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_bf16_rows(gate_up, "silu_mul");
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0, "silu_mul: the row width ", gate_up.size(1), " must be even");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  const uint16_t* src = bits(gate_up);
  uint16_t* dst = bits(out);
  const int64_t row_stride = gate_up.stride(0);
  at::parallel_for(0, rows, rows_per_task(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* gate = src + r * row_stride;
      const uint16_t* up = gate + width;
      uint16_t* o = dst + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        // sigmoid(g) from e^-|g|, which never overflows: 1 / (1 + e) for g >= 0, e / (1 + e) below.
        const float g = bf16_bits_to_float(gate[i]);
        const float e = kvos::exp_nonpositive(-std::fabs(g));
        const float sigmoid = (g >= 0.0f ? 1.0f : e) / (1.0f + e);
        const float silu = round_bf16(g * sigmoid);
        o[i] = float_to_bf16_bits(silu * bf16_bits_to_float(up[i]));
      }
    }
  });
  return out;
}

/* x: (T, N, D) bfloat16, any token stride, heads and head_dim contiguous; cos, sin_rotated: (T, 1, D)
 * bfloat16 (sin's first half negated) -> (T, N, D) bfloat16. */
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin_rotated) {
  TORCH_CHECK_VALUE(x.dim() == 3 && x.scalar_type() == at::kBFloat16 && x.stride(2) == 1 && x.stride(1) == x.size(2),
                    "rotary: x must be bfloat16 (tokens, heads, head_dim), each token's heads contiguous");
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2), half = head_dim / 2;
  TORCH_CHECK_VALUE(head_dim % 2 == 0, "rotary: head_dim ", head_dim, " must be even");
  for (const at::Tensor* table : {&cos, &sin_rotated}) {
    TORCH_CHECK_VALUE(table->dim() == 3 && table->size(0) == tokens && table->size(1) == 1 &&
                          table->size(2) == head_dim && table->scalar_type() == at::kBFloat16 &&
                          table->stride(2) == 1,
                      "rotary: cos and sin_rotated must be bfloat16 (", tokens, ", 1, ", head_dim, ")");
  }
  at::Tensor out = at::empty({tokens, heads, head_dim}, x.options());
  const uint16_t* src = bits(x);
  const uint16_t* cos_data = bits(cos);
  const uint16_t* sin_data = bits(sin_rotated);
  uint16_t* dst = bits(out);
  at::parallel_for(0, tokens, rows_per_task(heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t* c = cos_data + t * cos.stride(0);
      const uint16_t* s = sin_data + t * sin_rotated.stride(0);
      for (int64_t h = 0; h < heads; ++h) {
        const uint16_t* in = src + t * x.stride(0) + h * head_dim;
        uint16_t* o = dst + (t * heads + h) * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) {
          const int64_t partner = d < half ? d + half : d - half;  // roll by half a head
          const float straight = bf16_bits_to_float(in[d]) * bf16_bits_to_float(c[d]);
          const float turned = bf16_bits_to_float(in[partner]) * bf16_bits_to_float(s[d]);
          o[d] = float_to_bf16_bits(round_bf16(straight) + round_bf16(turned));
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvos, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin_rotated) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvos, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rotary", &rotary);
}
