/*
 * KV moves between the primary pool and the host tier on CPU: every run of blocks, in every layer's K
 * and V, in one call, by memcpy on the calling thread (the worker's copy thread).
 *
 * As torch ops a move is two copies per layer per run of blocks (60 for SmolLM2's 30 layers), each a
 * dispatch of several microseconds for a 6 KB block, and on the copy thread each parallel region also
 * waits for OpenMP workers that the engine thread's regions own: 0.2-0.4 ms for one block of SmolLM2's
 * KV on a second thread (`benchmarks/kv_moves.py`). Here one call walks the (tensor, run) pairs with
 * no dispatch and no parallel region (one core's memcpy is the rate a copy thread beside a forward
 * pass should take).
 *
 *   src[i], dst[i]: (slots, ...) tensors of one dtype and row size, each row contiguous (a layer's K or V;
 *                   rows may lie apart, as in the virtual cache's interleaved layers)
 *   runs: (n, 3) int64 rows of (first source block, first destination block, blocks)
 *   block b of a tensor: rows [b * block_size, (b + 1) * block_size)
 */

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

/* Each row (everything past dim 0) is one stretch of memory: strides from the sizes, innermost first.
 * Read off the strides rather than by `t[0].is_contiguous()`, which builds a view per tensor. */
bool rows_are_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t dim = t.dim() - 1; dim >= 1; --dim) {
    if (t.size(dim) != 1 && t.stride(dim) != expected) return false;
    expected *= t.size(dim);
  }
  return true;
}

int64_t row_size(const at::Tensor& t) {
  int64_t elements = 1;
  for (int64_t dim = 1; dim < t.dim(); ++dim) elements *= t.size(dim);
  return elements;
}

void copy_blocks(const std::vector<at::Tensor>& src, const std::vector<at::Tensor>& dst, const at::Tensor& runs,
                 int64_t block_size) {
  TORCH_CHECK_VALUE(src.size() == dst.size(), "copy_blocks: ", src.size(), " source tensors but ", dst.size(),
                    " destinations");
  TORCH_CHECK_VALUE(block_size >= 1, "copy_blocks: block_size must be >= 1, got ", block_size);
  TORCH_CHECK_VALUE(runs.dim() == 2 && runs.size(1) == 3 && runs.scalar_type() == at::kLong && runs.is_contiguous(),
                    "copy_blocks: runs must be a contiguous int64 (n, 3) tensor of (source, destination, blocks)");
  const int64_t* run = runs.data_ptr<int64_t>();
  const int64_t num_runs = runs.size(0);
  // Every pair and run is checked before the first byte moves: a refused call leaves the tiers as they were.
  struct Pair {
    const char* from;
    char* to;
    int64_t row_bytes, from_stride, to_stride;  // bytes of a row, and between rows
  };
  std::vector<Pair> pairs;
  for (size_t i = 0; i < src.size(); ++i) {
    const at::Tensor& s = src[i];
    const at::Tensor& d = dst[i];
    TORCH_CHECK_VALUE(s.device().is_cpu() && d.device().is_cpu() && s.dim() >= 1 && d.dim() >= 1 &&
                          rows_are_contiguous(s) && rows_are_contiguous(d),
                      "copy_blocks: tensor pair ", i, " must be CPU tensors of rows, each row contiguous");
    const int64_t row_elements = row_size(s);
    TORCH_CHECK_VALUE(s.scalar_type() == d.scalar_type() && row_elements == row_size(d),
                      "copy_blocks: tensor pair ", i, " differs in dtype or row size");
    const int64_t element = s.element_size();
    pairs.push_back({static_cast<const char*>(s.data_ptr()), static_cast<char*>(d.data_ptr()),
                     row_elements * element, s.stride(0) * element, d.stride(0) * element});
    const int64_t src_blocks = s.size(0) / block_size, dst_blocks = d.size(0) / block_size;
    for (int64_t r = 0; r < num_runs; ++r) {
      const int64_t first = run[3 * r], target = run[3 * r + 1], count = run[3 * r + 2];
      TORCH_CHECK_VALUE(count >= 0 && first >= 0 && target >= 0 && first + count <= src_blocks &&
                            target + count <= dst_blocks,
                        "copy_blocks: run ", r, " (", first, " -> ", target, ", ", count, " blocks) is outside ",
                        src_blocks, " source or ", dst_blocks, " destination blocks");
    }
  }
  for (const Pair& p : pairs) {
    const bool packed = p.from_stride == p.row_bytes && p.to_stride == p.row_bytes;
    for (int64_t r = 0; r < num_runs; ++r) {
      const int64_t first_row = run[3 * r] * block_size, target_row = run[3 * r + 1] * block_size;
      const int64_t rows = run[3 * r + 2] * block_size;
      if (packed) {  // the run's rows are one stretch of memory on both sides
        std::memcpy(p.to + target_row * p.row_bytes, p.from + first_row * p.row_bytes, rows * p.row_bytes);
        continue;
      }
      for (int64_t j = 0; j < rows; ++j)
        std::memcpy(p.to + (target_row + j) * p.to_stride, p.from + (first_row + j) * p.from_stride, p.row_bytes);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvos, m) {
  m.def("copy_blocks(Tensor[] src, Tensor(a!)[] dst, Tensor runs, int block_size) -> ()");
}

TORCH_LIBRARY_IMPL(kvos, CPU, m) { m.impl("copy_blocks", &copy_blocks); }
