/*
 * Scalar helpers shared by kvos's CPU kernels, written so that the compiler's
 * vectoriser (-O3 -march=native, `omp simd`) turns loops over them into whole
 * vector registers: no library calls, no branches it cannot turn into selects.
 */
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvos {

/* e^x for x <= 0 (a score minus its running max, or -|x| for a sigmoid):
 * e^x = 2^n * 2^f with n = round(x log2 e) and |f| <= 1/2; 2^f by a degree-7
 * polynomial in f ln 2 (relative error ~1e-8, below float32's). Below -87 the
 * result would be subnormal; it is flushed to 0. */
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float t = clamped * 1.4426950408889634f;
  const float n = std::nearbyint(t);
  const float g = (t - n) * 0.6931471805599453f;
  float p = 1.0f / 5040.0f;
  p = p * g + 1.0f / 720.0f;
  p = p * g + 1.0f / 120.0f;
  p = p * g + 1.0f / 24.0f;
  p = p * g + 1.0f / 6.0f;
  p = p * g + 0.5f;
  p = p * g + 1.0f;
  p = p * g + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

/* A bfloat16's bits as the float32 it is (exact: bfloat16 is float32's upper half). */
inline float bf16_bits_to_float(uint16_t raw) {
  const uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

/* float32 -> bfloat16 bits, rounded to nearest even as `Tensor.to(torch.bfloat16)` rounds
 * (c10::BFloat16's constructor), NaN kept a quiet NaN. */
inline uint16_t float_to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return value != value ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

inline void widen(float* __restrict dst, const c10::BFloat16* __restrict src, int64_t n) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = bf16_bits_to_float(raw[d]);
}

}  // namespace kvos
