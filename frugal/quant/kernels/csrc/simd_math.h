// Vector math shared by the fused per-token ops (fused_cpu.cpp) and decode attention
// (decode_attention_cpu.cpp): the CPU checks, exp over 16 floats, bf16 loads and exact bf16 rounding.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#define FRUGAL_SIMD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace frugal::simd {

inline bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

inline bool has_avx512_bf16() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// exp(x) for 16 floats: 2^n * p(r), n = round(x / ln 2), Cephes' degree-6 polynomial on |r| <= ln(2)/2
// (relative error ~1e-7), inputs clamped to [-87.3, 88] so 2^n stays a normal float.
FRUGAL_SIMD_AVX512 inline __m512 exp16(__m512 x) {
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

FRUGAL_SIMD_AVX512 inline void exp_inplace_avx512(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, exp16(_mm512_loadu_ps(v + i)));
  if (i < n) {
    const __mmask16 mask = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(v + i, mask, exp16(_mm512_maskz_loadu_ps(mask, v + i)));
  }
}

// v[i] = exp(v[i]); vectorised where the CPU allows.
inline void exp_inplace(float* v, int64_t n) {
  if (has_avx512()) {
    exp_inplace_avx512(v, n);
  } else {
    for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
  }
}

FRUGAL_SIMD_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
FRUGAL_SIMD_AVX512 inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// 16 values of T (float or bf16) as fp32 lanes. `round` is float(T(v)) and `store` writes T(v), both
// rounding exactly as c10 does (bf16: round to nearest even, NaN -> 0x7FC0), so vector code reproduces
// the scalar casts bit for bit.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  FRUGAL_SIMD_AVX512 static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  FRUGAL_SIMD_AVX512 static __m512 round(__m512 v) { return v; }
  FRUGAL_SIMD_AVX512 static void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
};

template <>
struct Lanes<at::BFloat16> {
  FRUGAL_SIMD_AVX512 static __m512 load(const at::BFloat16* p) { return load16(p); }
  // The bf16 bits of each lane's rounded value, in the low 16 bits of 32-bit lanes.
  FRUGAL_SIMD_AVX512 static __m512i rounded_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  }
  FRUGAL_SIMD_AVX512 static __m512 round(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(rounded_bits(v), 16));
  }
  FRUGAL_SIMD_AVX512 static void store(at::BFloat16* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded_bits(v)));
  }
};

template <typename T>
constexpr bool kHasLanes = std::is_same<T, float>::value || std::is_same<T, at::BFloat16>::value;

}  // namespace frugal::simd
