// y = x W^T (+ b) (+ residual) for fp32 on an AVX2+FMA CPU, with W packed once into panels.
//
// Layout. W [N, K] is packed into panels of kPanelRows = 6 weight rows, k-major: panel p holds
// W[6p + j, k] at [p, k, j] (rows past N are zeros). The activations are transposed per block of
// kBlockRows = 16 rows: [block, k, r] = x[16 block + r, k] (rows past M are zeros).
//
// Kernel. For one panel and one block, 12 AVX2 accumulators hold the 6 x 16 outputs; each k step
// loads 16 activations (two vectors), broadcasts 6 weights and does 12 FMAs. Every weight is read
// from memory once per block of 16 rows and used 16 times from registers; a block's activations
// (16 K floats) stay in L1/L2 while a thread streams its range of panels past them. Weights are
// prefetched 256 k-steps ahead (6 KiB), across panel boundaries. On the 2-core AVX2 machine a
// SmolLM2 forward pass's multiplies ran 1.45x faster than with oneDNN's packed fp32 path at 32
// rows, and 1.05-1.78x faster from 1 to 512 rows (benchmarks/linear_kernel.py, docs/benchmarks.md).
//
// Numerics. Each output is one fused multiply-add chain over k = 0 .. K-1 in order, then + bias,
// then + residual: the result of a row does not depend on the other rows of the batch, on how
// the batch is split into blocks, or on the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

constexpr int64_t kPanelRows = 6;
constexpr int64_t kBlockRows = 16;
constexpr int64_t kPrefetchSteps = 256;

// tile[j][r] = sum_k w[k, j] * at[k, r] for j < 6, r < 8 * V; w and at advance 6 and 16 floats per k.
template <int V>
inline void panel_times_block(const float* __restrict at, const float* __restrict w, int64_t depth,
                              float* __restrict tile) {
  __m256 acc[kPanelRows][V];
#pragma GCC unroll 8
  for (int j = 0; j < kPanelRows; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[j][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    if ((k & 7) == 0) {  // 8 steps = 192 bytes of weights = 3 cache lines
      const char* ahead = reinterpret_cast<const char*>(w + (k + kPrefetchSteps) * kPanelRows);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      _mm_prefetch(ahead + 128, _MM_HINT_T0);
    }
    __m256 a[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) a[v] = _mm256_loadu_ps(at + k * kBlockRows + 8 * v);
#pragma GCC unroll 8
    for (int j = 0; j < kPanelRows; ++j) {
      const __m256 weight = _mm256_broadcast_ss(w + k * kPanelRows + j);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[j][v] = _mm256_fmadd_ps(weight, a[v], acc[j][v]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < kPanelRows; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(tile + j * kBlockRows + 8 * v, acc[j][v]);
}

// x [M, K] (any strides) -> [blocks, K, 16]: [b, k, r] = x[16 b + r, k], zeros past row M, in
// one pass over x.
torch::Tensor transposed_blocks(const torch::Tensor& x, int64_t blocks) {
  const int64_t m = x.size(0), k = x.size(1), row_stride = x.stride(0), col_stride = x.stride(1);
  auto at = torch::empty({blocks, k, kBlockRows}, x.options());
  const float* xp = x.data_ptr<float>();
  float* out = at.data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b) {
    float* block = out + b * k * kBlockRows;
    const int64_t rows = std::min(kBlockRows, m - b * kBlockRows);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = xp + (b * kBlockRows + r) * row_stride;
      for (int64_t i = 0; i < k; ++i) block[i * kBlockRows + r] = row[i * col_stride];
    }
    for (int64_t r = rows; r < kBlockRows; ++r)
      for (int64_t i = 0; i < k; ++i) block[i * kBlockRows + r] = 0.f;
  }
  return at;
}

}  // namespace

bool packed_linear_available() { return true; }

// W [N, K] -> panels [ceil(N / 6), K, 6], zero rows past N.
torch::Tensor pack_linear(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat && weight.device().is_cpu(),
              "pack_linear: weight must be a 2-D fp32 CPU tensor");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t panels = (n + kPanelRows - 1) / kPanelRows;
  auto padded = torch::zeros({panels * kPanelRows, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, kPanelRows, k}).transpose(1, 2).contiguous();
}

torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t n,
                            const c10::optional<torch::Tensor>& bias,
                            const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "packed_linear: x must be a 2-D fp32 CPU tensor");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() && panels.scalar_type() == torch::kFloat &&
              panels.size(1) == k && panels.size(2) == kPanelRows && n > 0 &&
              n <= panels.size(0) * kPanelRows && n > (panels.size(0) - 1) * kPanelRows,
              "packed_linear: panels must come from pack_linear of an [n, K] weight, K = x's width");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                bias->scalar_type() == torch::kFloat && bias->device().is_cpu(),
                "packed_linear: bias must be a contiguous fp32 CPU vector of n");
  }
  if (residual) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n &&
                residual->is_contiguous() && residual->scalar_type() == torch::kFloat &&
                residual->device().is_cpu(), "packed_linear: residual must be a contiguous fp32 [M, n] CPU tensor");
  }
  auto y = torch::empty({m, n}, x.options());
  if (m == 0) return y;
  const int64_t blocks = (m + kBlockRows - 1) / kBlockRows;
  const auto at = transposed_blocks(x, blocks);
  const float* atp = at.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual ? residual->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t count = panels.size(0);
  at::parallel_for(0, count, 16, [&](int64_t first, int64_t last) {
    alignas(64) float tile[kPanelRows * kBlockRows];
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t row0 = b * kBlockRows, rows = std::min(kBlockRows, m - row0);
      const float* block = atp + b * k * kBlockRows;
      for (int64_t p = first; p < last; ++p) {
        const float* panel = wp + p * k * kPanelRows;
        if (rows > 8) panel_times_block<2>(block, panel, k, tile);
        else panel_times_block<1>(block, panel, k, tile);
        const int64_t col0 = p * kPanelRows, cols = std::min(kPanelRows, n - col0);
        for (int64_t r = 0; r < rows; ++r) {
          float* out = yp + (row0 + r) * n + col0;
          for (int64_t j = 0; j < cols; ++j) {
            float value = tile[j * kBlockRows + r];
            if (bp) value += bp[col0 + j];
            if (rp) value += rp[(row0 + r) * n + col0 + j];
            out[j] = value;
          }
        }
      }
    }
  });
  return y;
}

#else  // no AVX2+FMA: the Python side keeps oneDNN's packed path

bool packed_linear_available() { return false; }

torch::Tensor pack_linear(const torch::Tensor&) {
  TORCH_CHECK(false, "pack_linear needs a CPU with AVX2 and FMA");
}

torch::Tensor packed_linear(const torch::Tensor&, const torch::Tensor&, int64_t,
                            const c10::optional<torch::Tensor>&, const c10::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "packed_linear needs a CPU with AVX2 and FMA");
}

#endif
