// frugal CPU kernels for INT8 (per output channel) and dense BF16 weights, and the memory-bandwidth probe.
//
//   INT8, any activation: one weight row per stream (vpmovsxbd, vcvtdq2ps, FMA into four accumulators),
//                         fp32 activations, the row scale applied at the end.
//   BF16: vdpbf16ps straight from the weight rows: one row at a time for a single activation row (one
//         sequential stream), 4 rows x 4 activation rows per tile for batches.
// Large batches dequantise (INT8) or call at::mm directly. See int4_cpu.cpp for the design.
#include "common.h"

namespace frugal {
namespace {

// ------------------------------------------------------------------------------------------------
// INT8 (per output channel) x FP32 activations, and dense BF16 x BF16.

template <int MT, int NT>
FRUGAL_AVX512 void int8_tile_f32(const int8_t* qw, int64_t K, const float* x, int64_t ldx, int64_t n0,
                                 const Out& out, int64_t m0) {
  __m512 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 w[NT];
    for (int n = 0; n < NT; ++n)
      w[n] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qw + (n0 + n) * K + k))));
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int n = 0; n < NT; ++n) acc[m][n] = _mm512_fmadd_ps(w[n], xv, acc[m][n]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) out.store(m0 + m, n0 + n, _mm512_reduce_add_ps(acc[m][n]));
}

// One weight row, one activation row: a single sequential stream (what the prefetchers like best), with
// four independent accumulators so the FMA latency does not bound it.
FRUGAL_AVX512 void int8_row_f32(const int8_t* qw, int64_t K, const float* x, int64_t n, const Out& out,
                                int64_t m0) {
  const int8_t* row = qw + n * K;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t k = 0;
  auto load = [&](int64_t at) FRUGAL_AVX512 {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + at))));
  };
  for (; k + 64 <= K; k += 64) {
    acc0 = _mm512_fmadd_ps(load(k), _mm512_loadu_ps(x + k), acc0);
    acc1 = _mm512_fmadd_ps(load(k + 16), _mm512_loadu_ps(x + k + 16), acc1);
    acc2 = _mm512_fmadd_ps(load(k + 32), _mm512_loadu_ps(x + k + 32), acc2);
    acc3 = _mm512_fmadd_ps(load(k + 48), _mm512_loadu_ps(x + k + 48), acc3);
  }
  for (; k < K; k += 16) acc0 = _mm512_fmadd_ps(load(k), _mm512_loadu_ps(x + k), acc0);
  out.store(m0, n, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3))));
}

template <int MT, int NT>
FRUGAL_AVX512 void bf16_tile(const uint16_t* w, int64_t K, const uint16_t* x, int64_t ldx, int64_t n0,
                             const Out& out, int64_t m0) {
  __m512 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[NT];
    for (int n = 0; n < NT; ++n) wv[n] = _mm512_loadu_si512(w + (n0 + n) * K + k);
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * ldx + k);
      for (int n = 0; n < NT; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], (__m512bh)wv[n], (__m512bh)xv);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) out.store(m0 + m, n0 + n, _mm512_reduce_add_ps(acc[m][n]));
}

// One BF16 weight row against one activation row, as int8_row_f32: the 4-row tile below reads four rows
// 2K bytes apart at once, four streams that the prefetchers serve worse than one (one thread reading
// 1 GiB: 28 GB/s as one stream, 19-20 GB/s as 2-8 interleaved ones; one-off probe).
FRUGAL_AVX512 void bf16_row(const uint16_t* w, int64_t K, const uint16_t* x, int64_t n, const Out& out, int64_t m0) {
  const uint16_t* row = w + n * K;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  auto dot = [&](__m512 acc, int64_t at) FRUGAL_AVX512 {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(row + at), (__m512bh)_mm512_loadu_si512(x + at));
  };
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    acc0 = dot(acc0, k);
    acc1 = dot(acc1, k + 32);
    acc2 = dot(acc2, k + 64);
    acc3 = dot(acc3, k + 96);
  }
  for (; k < K; k += 32) acc0 = dot(acc0, k);
  out.store(m0, n, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3))));
}

}  // namespace

// y = (x @ qweight^T) * scales (+ bias). qweight int8 [N, K], scales float32 [N].
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias, int64_t max_gemv_rows) {
  check_common(x, at::kChar, qweight);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "activation has ", K, " features, weight has ", qweight.size(1));
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N, "scales must be float32 [N]");
  if (M > max_gemv_rows || K % 16 != 0 || !cpu_has_avx512_bf16())  // s * q exact in fp32
    return blas_linear(x, qweight.to(at::kFloat).mul_(scales.unsqueeze(1)).to(x.scalar_type()), bias);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, x.options()), bias_f32;
  const Out o = make_out(out, bias_f32, bias, scales.data_ptr<float>());
  const int8_t* qw = qweight.data_ptr<int8_t>();
  const float* xp = xf.data_ptr<float>();
  run_tiles(
      M, N, N * K,
      [&](int64_t m, int64_t n0) { for (int r = 0; r < kTileRows; ++r) int8_row_f32(qw, K, xp + m * K, n0 + r, o, m); },
      [&](int64_t m, int64_t n0) { int8_tile_f32<kTileBatch, kTileRows>(qw, K, xp + m * K, K, n0, o, m); },
      [&](int64_t m, int64_t n) { int8_tile_f32<1, 1>(qw, K, xp + m * K, K, n, o, m); });
  return out;
}

// y = x @ w^T (+ bias) for bf16 x and w [N, K]; batch rows <= max_gemv_rows use the streaming kernel.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t max_gemv_rows) {
  check_common(x, at::kBFloat16, weight);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "activation has ", K, " features, weight has ", weight.size(1));
  if (M > max_gemv_rows || K % 32 != 0 || x.scalar_type() != at::kBFloat16 || !cpu_has_avx512_bf16())
    return blas_linear(x, weight, bias);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, N}, x.options()), bias_f32;
  const Out o = make_out(out, bias_f32, bias, nullptr);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  run_tiles(
      M, N, N * K * 2,
      [&](int64_t m, int64_t n0) { for (int r = 0; r < kTileRows; ++r) bf16_row(w, K, xp + m * K, n0 + r, o, m); },
      [&](int64_t m, int64_t n0) { bf16_tile<kTileBatch, kTileRows>(w, K, xp + m * K, K, n0, o, m); },
      [&](int64_t m, int64_t n) { bf16_tile<1, 1>(w, K, xp + m * K, K, n, o, m); });
  return out;
}

// Read every byte of `buffer` once (64-byte vector loads, OR-reduced so nothing is optimised away),
// split across torch's threads: the memory-bandwidth probe of `frugal bench`. Returns the OR of all
// 64-bit words.
namespace {
FRUGAL_AVX512 uint64_t or_reduce_avx512(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    a0 = _mm512_or_si512(a0, _mm512_load_si512(p + i));
    a1 = _mm512_or_si512(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_or_si512(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_or_si512(a3, _mm512_load_si512(p + i + 192));
  }
  uint64_t out = uint64_t(_mm512_reduce_or_epi64(_mm512_or_si512(_mm512_or_si512(a0, a1), _mm512_or_si512(a2, a3))));
  for (; i < n; ++i) out |= p[i];
  return out;
}
}  // namespace

int64_t read_probe(const at::Tensor& buffer) {
  TORCH_CHECK(buffer.is_contiguous() && buffer.scalar_type() == at::kByte && buffer.device().is_cpu(),
              "read_probe needs a contiguous CPU uint8 tensor");
  const uint8_t* base = buffer.data_ptr<uint8_t>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(base) % 64 == 0, "read_probe needs a 64-byte aligned buffer");
  const int64_t n = buffer.numel(), chunk = 1 << 20;
  std::atomic<uint64_t> total{0};
  frugal::WorkSharing::instance().run((n + chunk - 1) / chunk, [&](int64_t c) {
    uint64_t local = 0;
    {
      const int64_t start = c * chunk, len = std::min(chunk, n - start);
      if (cpu_has_avx512_bf16()) {
        local |= or_reduce_avx512(base + start, len);
      } else {
        for (int64_t i = 0; i < len; i += 8) {
          uint64_t word = 0;
          std::memcpy(&word, base + start + i, std::min<int64_t>(8, len - i));
          local |= word;
        }
      }
    }
    total.fetch_or(local);
  });
  return int64_t(total.load());
}

}  // namespace frugal
