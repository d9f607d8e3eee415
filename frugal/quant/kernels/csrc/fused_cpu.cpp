// Fused CPU ops for the per-token path, registered as torch.ops.frugal.*:
//
//   rms_norm(x, weight, eps)                    -> weight * to(x.dtype)(x32 * rsqrt(mean(x32^2) + eps))
//   fused_add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)
//   rotary_embedding(positions, query, key, cos_cache, sin_cache) -> (query', key'), neox "rotate half"
//   silu_and_mul(x)                             -> silu(x[..., :d]) * x[..., d:]
//   paged_attention_decode(query, kv_cache, block_tables, seq_lens, scale, sliding_window)
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
#include "work_sharing.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

#define FRUGAL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

// exp(x) for 16 floats: 2^n * p(r), n = round(x / ln 2), Cephes' degree-6 polynomial on |r| <= ln(2)/2
// (relative error ~1e-7), inputs clamped to [-87.3, 88] so 2^n stays a normal float.
FRUGAL_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

FRUGAL_AVX512 void exp_inplace_avx512(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, exp16(_mm512_loadu_ps(v + i)));
  if (i < n) {
    const __mmask16 mask = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(v + i, mask, exp16(_mm512_maskz_loadu_ps(mask, v + i)));
  }
}

// v[i] = exp(v[i]); vectorised where the CPU allows.
void exp_inplace(float* v, int64_t n) {
  if (has_avx512()) {
    exp_inplace_avx512(v, n);
  } else {
    for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
  }
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// ---- RMSNorm ------------------------------------------------------------------------------------

template <typename T>
void rms_norm_kernel(const T* x, const T* residual, const T* weight, T* out, T* sum_out, int64_t rows,
                     int64_t hidden, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(16, 65536 / std::max<int64_t>(hidden, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(hidden);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * hidden;
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

template <typename T>
void rotary_kernel(const int64_t* positions, T* q, int64_t q_tok_stride, int64_t q_head_stride, int64_t num_heads,
                   T* k, int64_t k_tok_stride, int64_t k_head_stride, int64_t num_kv_heads, const float* cos,
                   const float* sin, int64_t head_dim, int64_t num_tokens) {
  const int64_t half = head_dim / 2;
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
        for (int64_t j = 0; j < len; ++j) e[j] = -to_float(gate[j]);
        exp_inplace(e, len);
        for (int64_t j = 0; j < len; ++j) {
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

// ---- paged attention, decode rows ---------------------------------------------------------------
//
// query [B, H, D] (one row per request), kv_cache [2, num_blocks, block_size, Hkv, D], block_tables
// [B, max_blocks] int64, seq_lens [B] int64. Request b attends to positions [start, seq_lens[b]) where
// start = seq_len - sliding_window when a window is set (> 0). fp32 scores, softmax and accumulation.


template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

FRUGAL_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
FRUGAL_AVX512 inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

void softmax_rows(float* scores, int64_t G, int64_t L) {
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * L;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < L; ++i) mx = std::max(mx, s[i]);
    for (int64_t i = 0; i < L; ++i) s[i] -= mx;
    exp_inplace(s, L);
    float total = 0.f;
    for (int64_t i = 0; i < L; ++i) total += s[i];
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < L; ++i) s[i] *= inv;
  }
}

// scores[g][p] = scale * q_g . k_p for the G query heads of one KV head; acc_g = sum_p softmax(scores_g)[p] v_p.
struct GroupArgs {
  const float* q;  // [G, D]
  int64_t G, D;
  const int64_t* table;
  int64_t block_size, block_stride, token_stride, start, end;
  float scale;
  float* scores;  // [G, end - start]
  float* acc;     // [G, D]
  int64_t slot(int64_t p) const { return table[p / block_size] * block_stride + (p % block_size) * token_stride; }
};

template <typename T>
void attend_group_scalar(const GroupArgs& a, const T* k_base, const T* v_base) {
  const int64_t L = a.end - a.start;
  for (int64_t p = a.start; p < a.end; ++p) {
    const T* k = k_base + a.slot(p);
    for (int64_t g = 0; g < a.G; ++g) {
      float dot = 0.f;
      for (int64_t i = 0; i < a.D; ++i) dot += a.q[g * a.D + i] * to_float(k[i]);
      a.scores[g * L + (p - a.start)] = dot * a.scale;
    }
  }
  softmax_rows(a.scores, a.G, L);
  std::fill(a.acc, a.acc + a.G * a.D, 0.f);
  for (int64_t p = a.start; p < a.end; ++p) {
    const T* v = v_base + a.slot(p);
    for (int64_t g = 0; g < a.G; ++g) {
      const float w = a.scores[g * L + (p - a.start)];
      for (int64_t i = 0; i < a.D; ++i) a.acc[g * a.D + i] += w * to_float(v[i]);
    }
  }
}

// Cached K/V rows are scattered over blocks (the hardware prefetcher cannot follow the block table):
// fetch the row kPrefetchAhead positions ahead while working on this one.
constexpr int64_t kPrefetchAhead = 8;

template <typename T>
inline void prefetch_row(const T* base, const GroupArgs& a, int64_t p, int64_t row_bytes) {
  if (p < a.end) {
    const char* row = reinterpret_cast<const char*>(base + a.slot(p));
    for (int64_t offset = 0; offset < row_bytes; offset += 64) _mm_prefetch(row + offset, _MM_HINT_T0);
  }
}

template <typename T>
FRUGAL_AVX512 void attend_group_avx512(const GroupArgs& a, const T* k_base, const T* v_base) {
  const int64_t L = a.end - a.start;
  const int64_t row_bytes = a.D * int64_t(sizeof(T));
  for (int64_t p = a.start; p < a.end; ++p) {
    prefetch_row(k_base, a, p + kPrefetchAhead, row_bytes);
    const T* k = k_base + a.slot(p);
    for (int64_t g = 0; g < a.G; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < a.D; i += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(a.q + g * a.D + i), load16(k + i), sum);
      a.scores[g * L + (p - a.start)] = _mm512_reduce_add_ps(sum) * a.scale;
    }
  }
  softmax_rows(a.scores, a.G, L);
  std::fill(a.acc, a.acc + a.G * a.D, 0.f);
  for (int64_t p = a.start; p < a.end; ++p) {
    prefetch_row(v_base, a, p + kPrefetchAhead, row_bytes);
    const T* v = v_base + a.slot(p);
    for (int64_t g = 0; g < a.G; ++g) {
      const __m512 w = _mm512_set1_ps(a.scores[g * L + (p - a.start)]);
      float* acc = a.acc + g * a.D;
      for (int64_t i = 0; i < a.D; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(w, load16(v + i), _mm512_loadu_ps(acc + i)));
    }
  }
}


// sums[j] = sum of the 16 lanes of v[j], for 16 vectors at once (a transpose-and-add tree: 45 shuffles/adds
// instead of 16 horizontal reductions).
FRUGAL_AVX512 inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: [x0+x2, y0+y2, x1+x3, y1+y3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per chunk c: [S(v[4i], c), S(v[4i+1], c), S(v[4i+2], c), S(v[4i+3], c)]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s0, s1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s0, s1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Head dim D = 16 * ND. K phase: 16 positions at a time, their rows converted to fp32 once, one head's
// 16 dot products reduced together by hsum16. V phase: accumulators of HG heads kept in registers.
template <typename T, int ND>
FRUGAL_AVX512 void attend_group_blocked(const GroupArgs& a, const T* k_base, const T* v_base) {
  constexpr int D = 16 * ND;
  constexpr int HG = ND <= 4 ? 4 : 2;  // heads per V pass: HG * ND accumulators + ND values <= 24 registers
  const int64_t L = a.end - a.start;
  const int64_t row_bytes = D * int64_t(sizeof(T));
  alignas(64) float kbuf[16][D];
  for (int64_t c0 = a.start; c0 < a.end; c0 += 16) {
    const int n = int(std::min<int64_t>(16, a.end - c0));
    for (int j = 0; j < n; ++j) {
      prefetch_row(k_base, a, c0 + j + 16, row_bytes);
      const T* k = k_base + a.slot(c0 + j);
      for (int i = 0; i < ND; ++i) _mm512_store_ps(kbuf[j] + 16 * i, load16(k + 16 * i));
    }
    for (int64_t g = 0; g < a.G; ++g) {
      __m512 qv[ND];
      for (int i = 0; i < ND; ++i) qv[i] = _mm512_loadu_ps(a.q + g * D + 16 * i);
      __m512 dots[16];
      for (int j = 0; j < 16; ++j) {
        __m512 acc = _mm512_setzero_ps();
        if (j < n)
          for (int i = 0; i < ND; ++i) acc = _mm512_fmadd_ps(qv[i], _mm512_load_ps(kbuf[j] + 16 * i), acc);
        dots[j] = acc;
      }
      const __m512 sums = _mm512_mul_ps(hsum16(dots), _mm512_set1_ps(a.scale));
      _mm512_mask_storeu_ps(a.scores + g * L + (c0 - a.start), (__mmask16)((1u << n) - 1), sums);
    }
  }
  softmax_rows(a.scores, a.G, L);
  for (int64_t g0 = 0; g0 < a.G; g0 += HG) {
    const int hg = int(std::min<int64_t>(HG, a.G - g0));
    __m512 acc[HG][ND];
    for (int h = 0; h < HG; ++h)
      for (int i = 0; i < ND; ++i) acc[h][i] = _mm512_setzero_ps();
    for (int64_t p = a.start; p < a.end; ++p) {
      if (g0 == 0) prefetch_row(v_base, a, p + kPrefetchAhead, row_bytes);
      const T* v = v_base + a.slot(p);
      __m512 vv[ND];
      for (int i = 0; i < ND; ++i) vv[i] = load16(v + 16 * i);
      for (int h = 0; h < HG; ++h) {
        if (h >= hg) break;
        const __m512 w = _mm512_set1_ps(a.scores[(g0 + h) * L + (p - a.start)]);
        for (int i = 0; i < ND; ++i) acc[h][i] = _mm512_fmadd_ps(w, vv[i], acc[h][i]);
      }
    }
    for (int h = 0; h < hg; ++h)
      for (int i = 0; i < ND; ++i) _mm512_storeu_ps(a.acc + (g0 + h) * D + 16 * i, acc[h][i]);
  }
}

template <typename T>
void paged_attention_decode_kernel(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                   const at::Tensor& seq_lens, double scale, int64_t sliding_window, at::Tensor& out) {
  const int64_t B = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t block_size = kv_cache.size(2), Hkv = kv_cache.size(3), G = H / Hkv;
  const int64_t block_stride = kv_cache.stride(1), token_stride = kv_cache.stride(2), head_stride = kv_cache.stride(3);
  const T* k_cache = kv_cache.data_ptr<T>();
  const T* v_cache = k_cache + kv_cache.stride(0);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t table_stride = block_tables.stride(0);
  const bool vector = has_avx512() && D % 16 == 0 && (std::is_same<T, float>::value || std::is_same<T, at::BFloat16>::value);
  int64_t total_positions = 0;
  for (int64_t b = 0; b < B; ++b) total_positions += lens[b];
  // One chunk per (request, KV head); threads only when there is enough to attend (the caller does all
  // chunks itself when helpers are busy elsewhere).
  const int64_t num_items = B * Hkv;
  auto run = [&](int64_t w0, int64_t w1) {
    std::vector<float> q(G * D), acc(G * D), scores;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hkv, kvh = w % Hkv;
      const int64_t end = lens[b];
      const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, end - sliding_window) : 0;
      scores.resize(G * std::max<int64_t>(end - start, 1));
      for (int64_t g = 0; g < G; ++g)
        load_row(query.data_ptr<T>() + b * query.stride(0) + (kvh * G + g) * query.stride(1), q.data() + g * D, D);
      const T* kb = k_cache + kvh * head_stride;
      const T* vb = v_cache + kvh * head_stride;
      const GroupArgs args{q.data(), G, D, tables + b * table_stride, block_size, block_stride, token_stride,
                           start, end, float(scale), scores.data(), acc.data()};
      bool done = false;
      if constexpr (std::is_same<T, float>::value || std::is_same<T, at::BFloat16>::value) {
        if (vector && D == 32) {
          attend_group_blocked<T, 2>(args, kb, vb);
        } else if (vector && D == 64) {
          attend_group_blocked<T, 4>(args, kb, vb);
        } else if (vector && D == 128) {
          attend_group_blocked<T, 8>(args, kb, vb);
        } else if (vector) {
          attend_group_avx512<T>(args, kb, vb);
        }
        done = vector;
      }
      if (!done) attend_group_scalar<T>(args, kb, vb);
      for (int64_t g = 0; g < G; ++g) {
        T* o = out.data_ptr<T>() + b * out.stride(0) + (kvh * G + g) * out.stride(1);
        for (int64_t i = 0; i < D; ++i) o[i] = round_to<T>(acc[g * D + i]);
      }
    }
  };
  if (total_positions * Hkv >= 1024) {
    frugal::WorkSharing::instance().run(num_items, [&](int64_t item) { run(item, item + 1); });
  } else {
    run(0, num_items);
  }
}

at::Tensor paged_attention_decode_cpu(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                      const at::Tensor& seq_lens, double scale, int64_t sliding_window) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [B, H, D] with a contiguous last dimension");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be contiguous [2, num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(kv_cache.scalar_type() == query.scalar_type(), "query and kv_cache dtypes differ");
  TORCH_CHECK(query.size(1) % kv_cache.size(3) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  block_tables.stride(1) == 1 && seq_lens.is_contiguous() && seq_lens.numel() == query.size(0),
              "block_tables [B, max_blocks] and seq_lens [B] must be int64");
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention_decode", [&] {
    paged_attention_decode_kernel<scalar_t>(query, kv_cache, block_tables, seq_lens, scale, sliding_window, out);
  });
  return out;
}

}  // namespace

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
at::Tensor paged_attention_decode(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t sliding_window) {
  return paged_attention_decode_cpu(query, kv_cache, block_tables, seq_lens, scale, sliding_window);
}
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
  m.impl("paged_attention_decode", &paged_attention_decode_cpu);
}

TORCH_LIBRARY_IMPL(frugal, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", &rms_norm_any);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_any);
  m.impl("rotary_embedding", &rotary_embedding_any);
  m.impl("silu_and_mul", &silu_and_mul_any);
}
