// Fused CPU kernels for the model's elementwise work, and the bindings of linear.cpp's packed
// matrix multiply (built on first use by elastic_llm/model/cpu_ops.py; the eager PyTorch ops and
// oneDNN run where this cannot be built).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// Rows [begin, end) of a [rows, width] job in blocks of about 64K floats per thread.
int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(width, 1));
}

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
  at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * width;
      const float scale = 1.f / std::sqrt(sum_of_squares(row, width) / static_cast<float>(width) + epsilon);
      float* o = op + t * width;
      for (int64_t i = 0; i < width; ++i) o[i] = wp[i] * (row[i] * scale);
    }
  });
  return out;
}

// Rotate x [T, H, D] (fp32, unit stride in D, rows of H*D floats at any row stride) in place by
// per-row cos / signed sin [T, D] (contiguous): x * cos + swap_halves(x) * sin, the same products
// and sums as Rotary.rotate_'s eager ops (built without FMA contraction: bit for bit).
void rotate_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat && x.device().is_cpu() &&
              x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "rotate_: x must be fp32 [T, H, D] on the CPU with contiguous heads");
  const int64_t rows = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  for (const auto* table : {&cos, &sin}) {
    TORCH_CHECK(table->dim() == 2 && table->is_contiguous() && table->scalar_type() == torch::kFloat &&
                table->size(0) == rows && table->size(1) == dim,
                "rotate_: cos and sin must be contiguous fp32 [T, D]");
  }
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t row_stride = x.stride(0);
  at::parallel_for(0, rows, grain_rows(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * dim;
      const float* s = sp + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = xp + t * row_stride + h * dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] + b * s[i];
          v[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

// Copy row r of rows [n, 2, Hkv, D] (keys then values; rows of 2*Hkv*D floats at any row stride)
// into pool [2, slots, Hkv, capacity, D] (any strides, unit stride in D) at slot slots[r],
// position positions[r]: the decode step's KV write, without advanced-indexing overhead.
void store_rows(torch::Tensor& pool, const torch::Tensor& slots, const torch::Tensor& positions,
                const torch::Tensor& rows) {
  TORCH_CHECK(pool.dim() == 5 && pool.scalar_type() == torch::kFloat && pool.device().is_cpu() &&
              pool.stride(4) == 1, "store_rows: pool must be fp32 [2, slots, Hkv, capacity, D] on the CPU");
  const int64_t n = rows.size(0), kv_heads = pool.size(2), dim = pool.size(4);
  TORCH_CHECK(rows.dim() == 4 && rows.scalar_type() == torch::kFloat && rows.size(1) == 2 &&
              rows.size(2) == kv_heads && rows.size(3) == dim && rows.stride(3) == 1 &&
              rows.stride(2) == dim && rows.stride(1) == kv_heads * dim,
              "store_rows: rows must be fp32 [n, 2, Hkv, D] with contiguous rows");
  for (const auto* index : {&slots, &positions}) {
    TORCH_CHECK(index->dim() == 1 && index->size(0) == n && index->scalar_type() == torch::kLong &&
                index->is_contiguous(), "store_rows: slots and positions must be int64 vectors of n");
  }
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(0 <= slot[r] && slot[r] < pool.size(1) && 0 <= position[r] && position[r] < pool.size(3),
                "store_rows: slot or position out of range");
  }
  float* pp = pool.data_ptr<float>();
  const float* rp = rows.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t part = 0; part < 2; ++part) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        float* dst = pp + part * pool.stride(0) + slot[r] * pool.stride(1) + h * pool.stride(2) +
                     position[r] * pool.stride(3);
        std::memcpy(dst, rp + r * rows.stride(0) + part * rows.stride(1) + h * dim, dim * sizeof(float));
      }
    }
  }
}

// linear.cpp
bool packed_linear_available();
torch::Tensor pack_linear(const torch::Tensor& weight);
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t n,
                            const c10::optional<torch::Tensor>& bias,
                            const c10::optional<torch::Tensor>& residual);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row of a 2-D fp32 CPU tensor");
  m.def("rotate_", &rotate_, "rotary embedding in place (rotate-half convention, signed sin)");
  m.def("store_rows", &store_rows, "copy KV rows into a pool at (slot, position)");
  m.def("packed_linear_available", &packed_linear_available, "whether packed_linear was built (AVX2+FMA)");
  m.def("pack_linear", &pack_linear, "pack a [N, K] fp32 weight into panels for packed_linear");
  m.def("packed_linear", &packed_linear, "x W^T (+ bias) (+ residual) with W packed by pack_linear",
        pybind11::arg("x"), pybind11::arg("panels"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("residual") = pybind11::none());
}
