/*
 * Greedy token ids: each row's argmax over float32 logits, in one pass per row.
 *
 * torch's argmax (and max with indices) reduce a (rows, vocab) float32 tensor
 * at 2-5 GB/s on this project's CPUs, about 3 ms a decode step at 64 rows of
 * SmolLM2's 49,152 logits (BENCHMARKS.md); a step's row is 192 KiB and still in
 * the caches from the logits GEMM. Here each row is two vectorised scans: its
 * maximum (and whether it holds a NaN), then the first position holding that
 * value. That is argmax's rule: the first maximum, and a NaN counts as the
 * largest value (the first NaN wins).
 */

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace {

int64_t row_argmax(const float* __restrict row, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    best = row[i] > best ? row[i] : best;
    nan |= row[i] != row[i];
  }
  // The first position holding it, found a chunk at a time so the test runs in vector registers.
  constexpr int64_t kChunk = 64;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t stop = std::min(n, start + kChunk);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t i = start; i < stop; ++i) hit |= nan ? row[i] != row[i] : row[i] == best;
    if (!hit) continue;
    for (int64_t i = start; i < stop; ++i) {
      if (nan ? row[i] != row[i] : row[i] == best) return i;
    }
  }
  return 0;  // a row of -inf only: its first position, as argmax answers
}

/* logits: (rows, vocab) float32, vocab contiguous -> (rows,) int64. */
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1 &&
                        logits.size(1) >= 1,
                    "argmax_rows: logits must be float32 (rows, vocab), vocab >= 1 and contiguous; got ",
                    logits.scalar_type(), " ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  at::Tensor ids = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* data = logits.data_ptr<float>();
  int64_t* out = ids.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = row_argmax(data + r * stride, vocab);
  });
  return ids;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvos, m) { m.def("argmax_rows(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(kvos, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
