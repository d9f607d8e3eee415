// Shared pieces of frugal's streaming CPU kernels (int4_cpu.cpp, dense_cpu.cpp): the CPU check, the
// output writer, the tile driver and argument checks. See int4_cpu.cpp for the design.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "work_sharing.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#define FRUGAL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))

namespace frugal {

inline bool cpu_has_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}

inline float half_to_float(uint16_t h) {
  // Portable IEEE half -> float (the AVX512 kernels use vcvtph2ps instead).
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal
      int e = -1;
      uint32_t m = mant;
      do { m <<= 1; ++e; } while ((m & 0x400u) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Where a tile's results go: [M, N] fp32 or bf16, after an optional per-column scale and bias.
struct Out {
  float* f32 = nullptr;
  at::BFloat16* bf16 = nullptr;
  int64_t ld = 0;
  const float* col_scale = nullptr;
  const float* bias = nullptr;
  inline void store(int64_t m, int64_t n, float v) const {
    if (col_scale) v *= col_scale[n];
    if (bias) v += bias[n];
    if (bf16)
      bf16[m * ld + n] = at::BFloat16(v);  // round to nearest even
    else
      f32[m * ld + n] = v;
  }
};

// ------------------------------------------------------------------------------------------------
// Driver: split the output rows across threads in tiles of NT, walk the activation rows in tiles of
// MT (4, then a 1-row remainder), write fp32 results into a [M, N] buffer.

constexpr int kTileRows = 4;  // NT
constexpr int kTileBatch = 4;  // MT

template <typename Tile1, typename Tile4, typename TileTail>
inline void run_tiles(int64_t M, int64_t N, int64_t weight_bytes, Tile1 tile1, Tile4 tile4, TileTail tail_row) {
  const int64_t num_tiles = N / kTileRows;
  constexpr int64_t kTilesPerChunk = 16;  // 64 output rows: ~64 KiB of INT4 weights at K = 2048
  // Below ~0.5 MiB of weights a second thread costs more (waking it) than it saves.
  constexpr int64_t kParallelMinBytes = 512 * 1024;
  const int64_t num_chunks = (num_tiles + kTilesPerChunk - 1) / kTilesPerChunk;
  frugal::WorkSharing::instance().run_streams(weight_bytes >= kParallelMinBytes ? num_chunks : -num_chunks, [&](int64_t chunk) {
    const int64_t t1 = std::min(num_tiles, (chunk + 1) * kTilesPerChunk);
    for (int64_t t = chunk * kTilesPerChunk; t < t1; ++t) {
      const int64_t n0 = t * kTileRows;
      int64_t m = 0;
      for (; m + kTileBatch <= M; m += kTileBatch) tile4(m, n0);
      for (; m < M; ++m) tile1(m, n0);
    }
  });
  for (int64_t n = num_tiles * kTileRows; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) tail_row(m, n);
}

// The output tensor [M, N] in `dtype` (float32 or bfloat16) and its Out view; `bias_f32` keeps a converted
// bias alive.
inline Out make_out(at::Tensor& out, at::Tensor& bias_f32, const c10::optional<at::Tensor>& bias, const float* col_scale) {
  Out o;
  o.ld = out.size(1);
  if (out.scalar_type() == at::kBFloat16)
    o.bf16 = out.data_ptr<at::BFloat16>();
  else
    o.f32 = out.data_ptr<float>();
  o.col_scale = col_scale;
  if (bias.has_value() && bias->defined()) {
    bias_f32 = bias->to(at::kFloat).contiguous();
    o.bias = bias_f32.data_ptr<float>();
  }
  return o;
}

// x [M, K] zero-padded to [M, Kp] features (the packed INT4 width), contiguous.
inline at::Tensor pad_k(const at::Tensor& x, int64_t Kp) {
  const int64_t K = x.size(1);
  TORCH_CHECK(K <= Kp, "activation has ", K, " features, weight expects at most ", Kp);
  return K == Kp ? x.contiguous() : at::constant_pad_nd(x, {0, Kp - K}).contiguous();
}

// The large-batch path of every kernel: y = x @ w^T (+ bias) through the BLAS.
inline at::Tensor blas_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  at::Tensor y = at::mm(x.contiguous(), w.t());
  if (bias.has_value() && bias->defined()) y.add_(bias->to(y.scalar_type()));
  return y;
}

// INT4 group parameters: scales float16 [N, ceil(Kp / G)], optional zeros uint8 of the same shape.
// Returns whether zeros are present.
inline bool check_int4_params(const at::Tensor& scales, const c10::optional<at::Tensor>& zeros, int64_t N, int64_t Kp,
                              int64_t group_size) {
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128");
  TORCH_CHECK(Kp % 64 == 0, "packed K must be a multiple of 64, got ", Kp);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.size(0) == N &&
                  scales.size(1) == (Kp + group_size - 1) / group_size && scales.is_contiguous(),
              "scales must be contiguous float16 [N, ceil(Kp / group_size)]");
  const bool has_zeros = zeros.has_value() && zeros->defined();
  if (has_zeros)
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->sizes() == scales.sizes() && zeros->is_contiguous(),
                "zeros must be contiguous uint8 shaped like scales");
  return has_zeros;
}

inline void check_common(const at::Tensor& x, at::ScalarType wdtype, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "frugal CPU kernels need CPU tensors");
  TORCH_CHECK(x.dim() == 2, "activation must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "activation dtype must be bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == wdtype && w.is_contiguous(), "weight must be contiguous ", wdtype);
}

}  // namespace frugal
