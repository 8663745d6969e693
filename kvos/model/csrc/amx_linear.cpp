/*
 * bfloat16 linears on the AMX tile unit for the row counts of a decode step: y = x W^T (+ bias).
 *
 * The GEMM itself is kvos/csrc/amx_gemm.h's. `pack` lays W (N x K) out once, at start-up, as the
 * tile instruction reads it:
 *
 *     packed[n_tile][k_pair][16 columns][2]      (N / 16 tiles of K / 2 rows of 64 bytes)
 *
 * so a column tile's whole K is one contiguous run that the hardware prefetcher streams. Column pairs
 * go in groups of 8, whose weights (8 x 2 x K x 32 bytes) stay in L2 while every 32-row block of x
 * (in L1) passes over them: W comes from memory once per call whatever M is.
 */

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "amx_gemm.h"

namespace {

#if defined(KVOS_AMX)
constexpr int64_t kGroup = 8;  // column pairs per pass of x
#endif

at::Tensor amx_pack(const at::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
                    "amx_pack: weight must be a bfloat16 (out_features, in_features) matrix");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK_VALUE(n % 32 == 0 && k % 32 == 0, "amx_pack: needs out_features and in_features multiples of 32, got ",
                    n, " x ", k);
  const at::Tensor w = weight.contiguous();
  // [n_tile][k_pair][column][2]: element (j, 2p + e) of tile t at ((t * K/2 + p) * 16 + j) * 2 + e, one dword
  // (a pair of k) at a time. A tile's 16 rows (16 x K x 2 bytes) stay in cache while they are scattered,
  // and the tiles are spread over the threads: at start-up this is memory-bound, where torch's permute
  // and copy of the same view took about 0.4 s for SmolLM2.
  at::Tensor packed = at::empty({n / 16, k / 2 * 32}, w.options());
  const uint32_t* src = reinterpret_cast<const uint32_t*>(w.data_ptr<c10::BFloat16>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<c10::BFloat16>());
  const int64_t pairs = k / 2;
  at::parallel_for(0, n / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint32_t* out = dst + t * pairs * 16;
      for (int64_t j = 0; j < 16; ++j) {
        const uint32_t* row = src + (16 * t + j) * pairs;
        for (int64_t p = 0; p < pairs; ++p) out[p * 16 + j] = row[p];
      }
    }
  });
  return packed;
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
  const int64_t n_tiles = packed.size(0), tile_words = x.size(1) / 2 * 16;
  at::Tensor y = at::empty({x.size(0), n_tiles * 16}, x.options());
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const uint32_t* b_data = reinterpret_cast<const uint32_t*>(packed.data_ptr<c10::BFloat16>());
  kvos::tile_gemm(x, n_tiles / 2, kGroup, bias.has_value() ? bias_f.data_ptr<float>() : nullptr, y,
                  [&](int64_t begin, int64_t) { return b_data + 2 * begin * tile_words; });
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
