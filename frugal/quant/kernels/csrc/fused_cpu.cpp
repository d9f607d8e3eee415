// Fused CPU ops for the per-token path, registered as torch.ops.frugal.*:
//
//   rms_norm(x, weight, eps)                    -> weight * to(x.dtype)(x32 * rsqrt(mean(x32^2) + eps))
//   fused_add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)
//   rotary_embedding(positions, query, key, cos_cache, sin_cache) -> (query', key'), neox "rotate half"
//   silu_and_mul(x)                             -> silu(x[..., :d]) * x[..., d:]
//   paged_attention_decode(query, kv_cache, block_tables, seq_lens, scale, sliding_window)
//                                               (implemented in decode_attention_cpu.cpp)
//
// Each replaces 3-15 PyTorch ops (and as many dispatches and temporaries) by one. They go parallel only
// for large inputs (prefill): a decode step's work is microseconds, less than waking a second thread —
// on a shared machine, far less. They reproduce the
// rounding of the PyTorch code they replace (frugal/layers/norm.py, rotary.py, activation.py): every
// intermediate the eager code materialises in the activation dtype is rounded to it here too; only
// the order of fp32 reductions differs. CPU kernels only; other devices get the same math through
// ATen (CompositeExplicitAutograd), so a model using these ops still runs anywhere.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "kernel_ops.h"
#include "simd_math.h"

#include <cmath>
#include <limits>
#include <cstring>
#include <vector>

namespace {

using frugal::simd::exp_inplace;

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// ---- RMSNorm ------------------------------------------------------------------------------------

// One row, 16 lanes at a time; the same roundings as the scalar loop below, the sum of squares in 16
// partial sums.
template <typename T>
FRUGAL_SIMD_AVX512 void rms_norm_row_avx512(const T* x, const T* residual, const T* weight, T* out, T* sum_out,
                                            float* row, int64_t hidden, float eps) {
  using L = frugal::simd::Lanes<T>;
  const int64_t full = hidden / 16 * 16;
  __m512 acc16 = _mm512_setzero_ps();
  for (int64_t h = 0; h < full; h += 16) {
    __m512 v = L::load(x + h);
    if (residual) {
      v = L::round(_mm512_add_ps(v, L::load(residual + h)));
      L::store(sum_out + h, v);
    }
    _mm512_storeu_ps(row + h, v);
    acc16 = _mm512_add_ps(acc16, _mm512_mul_ps(v, v));  // no FMA: the scalar loop rounds each square
  }
  float acc = _mm512_reduce_add_ps(acc16);
  for (int64_t h = full; h < hidden; ++h) {
    float v = to_float(x[h]);
    if (residual) {
      const T s = round_to<T>(v + to_float(residual[h]));
      sum_out[h] = s;
      v = to_float(s);
    }
    row[h] = v;
    acc += v * v;
  }
  const float inv = 1.0f / std::sqrt(acc / float(hidden) + eps);
  const __m512 inv16 = _mm512_set1_ps(inv);
  for (int64_t h = 0; h < full; h += 16)
    L::store(out + h, _mm512_mul_ps(L::load(weight + h), L::round(_mm512_mul_ps(_mm512_loadu_ps(row + h), inv16))));
  for (int64_t h = full; h < hidden; ++h) out[h] = round_to<T>(to_float(weight[h]) * to_float(round_to<T>(row[h] * inv)));
}

template <typename T>
void rms_norm_kernel(const T* x, const T* residual, const T* weight, T* out, T* sum_out, int64_t rows,
                     int64_t hidden, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(16, 65536 / std::max<int64_t>(hidden, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(hidden);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * hidden;
      if constexpr (frugal::simd::kHasLanes<T>) {
        if (frugal::simd::has_avx512()) {
          rms_norm_row_avx512<T>(xr, residual ? residual + r * hidden : nullptr, weight, out + r * hidden,
                                 residual ? sum_out + r * hidden : nullptr, row.data(), hidden, eps);
          continue;
        }
      }
      float acc = 0.f;
      if (residual) {
        const T* rr = residual + r * hidden;
        T* sr = sum_out + r * hidden;
        for (int64_t h = 0; h < hidden; ++h) {
          const T s = round_to<T>(to_float(xr[h]) + to_float(rr[h]));
          sr[h] = s;
          row[h] = to_float(s);
        }
      } else {
        for (int64_t h = 0; h < hidden; ++h) row[h] = to_float(xr[h]);
      }
      for (int64_t h = 0; h < hidden; ++h) acc += row[h] * row[h];
      const float inv = 1.0f / std::sqrt(acc / float(hidden) + eps);
      T* o = out + r * hidden;
      for (int64_t h = 0; h < hidden; ++h)
        o[h] = round_to<T>(to_float(weight[h]) * to_float(round_to<T>(row[h] * inv)));
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm needs contiguous tensors");
  TORCH_CHECK(x.size(-1) == weight.numel(), "hidden size ", x.size(-1), " != weight size ", weight.numel());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight dtypes differ");
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<scalar_t>(x.data_ptr<scalar_t>(), nullptr, weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              nullptr, rows, hidden, float(eps));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                          const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must be contiguous and match x");
  at::Tensor out = at::empty_like(x), sum = at::empty_like(x);
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm", [&] {
    rms_norm_kernel<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), sum.data_ptr<scalar_t>(), rows, hidden, float(eps));
  });
  return {out, sum};
}

at::Tensor rms_norm_any(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor x32 = x.to(at::kFloat);
  x32 = x32 * at::rsqrt(x32.pow(2).mean(-1, true) + eps);
  return weight * x32.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_any(const at::Tensor& x, const at::Tensor& residual,
                                                          const at::Tensor& weight, double eps) {
  at::Tensor sum = x + residual;
  return {rms_norm_any(sum, weight, eps), sum};
}

// ---- rotary embedding ---------------------------------------------------------------------------

// One head in place, half % 16 == 0: head = T(T(v * c) + T(rot * s)), rot = [-v[half:], v[:half]], with c
// and s already rounded to T; the scalar loop's roundings exactly.
template <typename T>
FRUGAL_SIMD_AVX512 void rotate_half_avx512(T* head, const float* c, const float* s, int64_t half) {
  using L = frugal::simd::Lanes<T>;
  const __m512i sign = _mm512_set1_epi32(INT32_MIN);
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 lo = L::load(head + i), hi = L::load(head + half + i);
    const __m512 minus_hi = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(hi), sign));
    const __m512 new_lo = _mm512_add_ps(L::round(_mm512_mul_ps(lo, _mm512_loadu_ps(c + i))),
                                        L::round(_mm512_mul_ps(minus_hi, _mm512_loadu_ps(s + i))));
    const __m512 new_hi = _mm512_add_ps(L::round(_mm512_mul_ps(hi, _mm512_loadu_ps(c + half + i))),
                                        L::round(_mm512_mul_ps(lo, _mm512_loadu_ps(s + half + i))));
    L::store(head + i, new_lo);
    L::store(head + half + i, new_hi);
  }
}

template <typename T>
void rotary_kernel(const int64_t* positions, T* q, int64_t q_tok_stride, int64_t q_head_stride, int64_t num_heads,
                   T* k, int64_t k_tok_stride, int64_t k_head_stride, int64_t num_kv_heads, const float* cos,
                   const float* sin, int64_t head_dim, int64_t num_tokens) {
  const int64_t half = head_dim / 2;
  const bool vector = frugal::simd::has_avx512() && half % 16 == 0;
  at::parallel_for(0, num_tokens, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> c(head_dim), s(head_dim), v(head_dim);
    for (int64_t t = t0; t < t1; ++t) {
      const float* cr = cos + positions[t] * head_dim;
      const float* sr = sin + positions[t] * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) {  // cos/sin are cast to the activation dtype first
        c[i] = to_float(round_to<T>(cr[i]));
        s[i] = to_float(round_to<T>(sr[i]));
      }
      auto rotate = [&](T* head) {
        if constexpr (frugal::simd::kHasLanes<T>) {
          if (vector) return rotate_half_avx512(head, c.data(), s.data(), half);
        }
        for (int64_t i = 0; i < head_dim; ++i) v[i] = to_float(head[i]);
        for (int64_t i = 0; i < head_dim; ++i) {
          const float rot = i < half ? -v[i + half] : v[i - half];
          const float a = to_float(round_to<T>(v[i] * c[i])), b = to_float(round_to<T>(rot * s[i]));
          head[i] = round_to<T>(a + b);
        }
      };
      for (int64_t h = 0; h < num_heads; ++h) rotate(q + t * q_tok_stride + h * q_head_stride);
      for (int64_t h = 0; h < num_kv_heads; ++h) rotate(k + t * k_tok_stride + h * k_head_stride);
    }
  });
}

// Rotates query [n, H, D] and key [n, Hkv, D] in place; any token/head strides, contiguous head_dim.
void rotary_inplace_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos_cache,
                        const at::Tensor& sin_cache) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3, "query/key must be [tokens, heads, head_dim]");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1 && query.size(0) == key.size(0) &&
                  query.size(2) == key.size(2),
              "query/key need a contiguous head_dim and the same tokens and head_dim");
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), "query and key dtypes differ");
  TORCH_CHECK(cos_cache.scalar_type() == at::kFloat && cos_cache.is_contiguous() && sin_cache.is_contiguous() &&
                  cos_cache.size(1) == query.size(2),
              "cos/sin caches must be contiguous float32 [max_position, head_dim]");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == query.size(0), "one position per token expected");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "rotary_embedding", [&] {
    rotary_kernel<scalar_t>(pos.data_ptr<int64_t>(), query.data_ptr<scalar_t>(), query.stride(0), query.stride(1),
                            query.size(1), key.data_ptr<scalar_t>(), key.stride(0), key.stride(1), key.size(1),
                            cos_cache.data_ptr<float>(), sin_cache.data_ptr<float>(), query.size(2), query.size(0));
  });
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cpu(const at::Tensor& positions, const at::Tensor& query_in,
                                                        const at::Tensor& key_in, const at::Tensor& cos_cache,
                                                        const at::Tensor& sin_cache) {
  at::Tensor query = query_in.clone(at::MemoryFormat::Contiguous), key = key_in.clone(at::MemoryFormat::Contiguous);
  rotary_inplace_cpu(positions, query, key, cos_cache, sin_cache);
  return {query, key};
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_any(const at::Tensor& positions, const at::Tensor& query,
                                                        const at::Tensor& key, const at::Tensor& cos_cache,
                                                        const at::Tensor& sin_cache) {
  const at::Tensor cos = cos_cache.index({positions}).unsqueeze(1).to(query.scalar_type());
  const at::Tensor sin = sin_cache.index({positions}).unsqueeze(1).to(query.scalar_type());
  auto rotate_half = [](const at::Tensor& x) {
    const int64_t half = x.size(-1) / 2;
    return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  };
  return {query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin};
}

// ---- SiLU and mul -------------------------------------------------------------------------------

// out[j] = T(T(g / (1 + exp(-g))) * up[j]) for the first len / 16 * 16 values, exactly as the scalar
// loop (same exp16, IEEE division); returns how many it did.
template <typename T>
FRUGAL_SIMD_AVX512 int64_t silu_and_mul_avx512(const T* gate, const T* up, T* out, int64_t len) {
  using L = frugal::simd::Lanes<T>;
  const __m512 one = _mm512_set1_ps(1.0f);
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m512 g = L::load(gate + j);
    const __m512 minus_g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(INT32_MIN)));
    const __m512 e = frugal::simd::exp16(minus_g);
    const __m512 silu = L::round(_mm512_div_ps(g, _mm512_add_ps(one, e)));
    L::store(out + j, _mm512_mul_ps(silu, L::load(up + j)));
  }
  return j;
}

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), "silu_and_mul needs a contiguous input");
  const int64_t d = x.size(-1) / 2, rows = x.numel() / (2 * d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d;
  at::Tensor out = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    constexpr int64_t kChunk = 256;
    const int64_t chunks_per_row = (d + kChunk - 1) / kChunk;
    at::parallel_for(0, rows * chunks_per_row, 256, [&](int64_t c0, int64_t c1) {
      float e[kChunk];
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r = c / chunks_per_row, j0 = (c % chunks_per_row) * kChunk, len = std::min(kChunk, d - j0);
        const scalar_t* gate = in + r * 2 * d + j0;
        const scalar_t* up = gate + d;
        int64_t done = 0;
        if constexpr (frugal::simd::kHasLanes<scalar_t>) {
          if (frugal::simd::has_avx512()) done = silu_and_mul_avx512(gate, up, o + r * d + j0, len);
        }
        for (int64_t j = done; j < len; ++j) e[j] = -to_float(gate[j]);
        exp_inplace(e + done, len - done);
        for (int64_t j = done; j < len; ++j) {
          const float g = to_float(gate[j]);
          const float silu = to_float(round_to<scalar_t>(g / (1.0f + e[j])));
          o[r * d + j0 + j] = round_to<scalar_t>(silu * to_float(up[j]));
        }
      }
    });
  });
  return out;
}

at::Tensor silu_and_mul_any(const at::Tensor& x) {
  const int64_t d = x.size(-1) / 2;
  return at::silu(x.narrow(-1, 0, d)) * x.narrow(-1, d, d);
}

// ---- argmax over rows (greedy sampling) -----------------------------------------------------------
//
// torch.argmax's answer (the first maximum; the first NaN if there is one) on one thread: over a 32-150k
// vocabulary ATen's reduction opens an OpenMP region, and waking its workers costs more than the scan.

FRUGAL_SIMD_AVX512 int64_t argmax_avx512(const float* v, int64_t n) {
  const int64_t full = n / 16 * 16;
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  for (int64_t i = 0; i < full; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, x);
  }
  float m = _mm512_reduce_max_ps(mx);
  bool any_nan = nan != 0;
  for (int64_t i = full; i < n; ++i) {
    any_nan |= std::isnan(v[i]);
    m = std::max(m, v[i]);
  }
  if (any_nan) {
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(v[i])) return i;
  }
  const __m512 target = _mm512_set1_ps(m);
  for (int64_t i = 0; i < full; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + i), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  for (int64_t i = full; i < n; ++i)
    if (v[i] == m) return i;
  return 0;  // unreachable for n > 0
}

int64_t argmax_scalar(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(v[i])) return i;
    if (v[i] > v[best]) best = i;
  }
  return best;
}

}  // namespace

namespace frugal {
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0 &&
                  logits.device().is_cpu(),
              "argmax_rows needs CPU float32 logits [rows, vocab] with vocab > 0");
  const at::Tensor x = logits.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const float* v = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    o[r] = simd::has_avx512() ? argmax_avx512(v + r * n, n) : argmax_scalar(v + r * n, n);
  return out;
}
}  // namespace frugal

// The CPU implementations, callable from C++ (kernel_ops.h; the whole-step decode in decode_stack.cpp).
namespace frugal::fused {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) { return rms_norm_cpu(x, weight, eps); }
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  return fused_add_rms_norm_cpu(x, residual, weight, eps);
}
void rotary_inplace(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos_cache,
                    const at::Tensor& sin_cache) {
  rotary_inplace_cpu(positions, query, key, cos_cache, sin_cache);
}
at::Tensor silu_and_mul(const at::Tensor& x) { return silu_and_mul_cpu(x); }
}  // namespace frugal::fused

TORCH_LIBRARY(frugal, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_embedding(Tensor positions, Tensor query, Tensor key, Tensor cos_cache, Tensor sin_cache) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("paged_attention_decode(Tensor query, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale, "
        "int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(frugal, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
  m.impl("rotary_embedding", &rotary_embedding_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("paged_attention_decode", &frugal::fused::paged_attention_decode);  // decode_attention_cpu.cpp
}

TORCH_LIBRARY_IMPL(frugal, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", &rms_norm_any);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_any);
  m.impl("rotary_embedding", &rotary_embedding_any);
  m.impl("silu_and_mul", &silu_and_mul_any);
}
