// Fused CPU kernels for the model's elementwise work (built on first use by
// elastic_llm/model/cpu_ops.py; the eager PyTorch ops run where this cannot be built).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// Sum of squares of n floats.
float sum_of_squares(const float* x, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#ifdef __AVX2__
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
    a = _mm256_fmadd_ps(u, u, a);
    b = _mm256_fmadd_ps(v, v, b);
  }
  __m256 s8 = _mm256_add_ps(a, b);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  total = _mm_cvtss_f32(s4);
#endif
  for (; i < n; ++i) total += x[i] * x[i];
  return total;
}

}  // namespace

// RMSNorm of each row of x [T, H] (fp32, contiguous): w * (x * rsqrt(mean(x^2) + eps)), one pass
// over the row after its sum of squares. Rows are spread over threads in blocks of >= 64K floats.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "rms_norm: x must be a contiguous 2-D fp32 CPU tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.scalar_type() == torch::kFloat &&
              weight.size(0) == x.size(1), "rms_norm: weight must be a contiguous fp32 vector of x's width");
  const int64_t rows = x.size(0), width = x.size(1);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * width;
      const float scale = 1.f / std::sqrt(sum_of_squares(row, width) / static_cast<float>(width) + epsilon);
      float* o = op + t * width;
      for (int64_t i = 0; i < width; ++i) o[i] = wp[i] * (row[i] * scale);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row of a 2-D fp32 CPU tensor");
}
