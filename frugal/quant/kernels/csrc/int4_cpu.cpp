// frugal CPU linear kernels: weight-only INT4 (group-wise) here; INT8 (per-channel) and dense BF16 in
// dense_cpu.cpp; shared driver in common.h, thread scheduling in work_sharing.h.
//
// Decoding one token reads every weight once, so a batch-1 linear layer is bounded by memory
// bandwidth / bytes of weights (Shen et al., "Efficient LLM Inference on CPUs", 2023). These kernels
// stream the packed weights once per call and spend a few vector instructions per byte:
//
//   INT4, activations bf16:  32 packed bytes -> vpmovzxbw, vpsrlw, 2x vpermw through a 32-entry
//                            table of bf16 (q - z), vdpbf16ps per group, FMA with the group scale.
//   INT4, activations fp32:  the same with 16-entry fp32 tables (vpermps) and FMAs.
//   INT8, any activation:    vpmovsxbd, vcvtdq2ps, FMA against fp32 activations, row scale at the end.
//   BF16 dense:              vdpbf16ps straight from the weight rows.
//
// The oracle is the reference path: dequantise to s*(q - z) in fp32 (exact), cast to the activation
// dtype, matmul. With fp32 activations the kernels use the same weight values and differ only in
// summation order; with bf16 activations they skip the oracle's rounding of s*(q - z) to bf16
// (products are exact, sums are fp32), so they are at least as accurate.
//
// Layout of the INT4 kernel weights (repacked at load from the canonical checkpoint layout, same sizes):
//   qweight [N, Kp/2] uint8, Kp % 64 == 0; the 64 weights k0..k0+63 of a row live in a 32-byte block,
//   byte j holding weight k0+j in its low nibble and weight k0+32+j in its high nibble. Rows come in
//   tiles of 4 (the first N4 = N - N % 4 rows): block b of the tile's 4 rows are adjacent (128 bytes), so
//   a thread reads its rows as one sequential stream (short per-row streams starve the prefetchers).
//   Rows N4.. stay row-major.
//   scales  [N, ceil(Kp/G)] float16 and zeros (uint8, absent for symmetric: z = 8) follow the same tiling:
//   a tile's values are stored [group][row].
//
// Large batches (prefill) dequantise the weight once into a scratch tensor and call at::mm, which
// is compute-bound and uses oneDNN/MKL. Machines without AVX512-BF16 take that path for every batch.
#include "common.h"

namespace frugal {
namespace {

// Addressing of the kernel layout (see the file comment).
struct Int4View {
  const uint8_t* qw;
  const uint16_t* sc;
  const uint8_t* z;  // nullptr when symmetric
  int64_t N, Kp, G, ldq, lds, N4;
  Int4View(const uint8_t* qw_, const uint16_t* sc_, const uint8_t* z_, int64_t N_, int64_t Kp_, int64_t G_)
      : qw(qw_), sc(sc_), z(z_), N(N_), Kp(Kp_), G(G_), ldq(Kp_ / 2), lds((Kp_ + G_ - 1) / G_), N4(N_ - N_ % 4) {}
  const uint8_t* qrow(int64_t n) const { return n < N4 ? qw + (n / 4) * 4 * ldq + (n % 4) * 32 : qw + n * ldq; }
  int64_t qstep(int64_t n) const { return n < N4 ? 128 : 32; }  // bytes from one block of a row to the next
  int64_t sidx(int64_t n, int64_t g) const { return n < N4 ? (n / 4) * 4 * lds + g * 4 + (n % 4) : n * lds + g; }
};

// ------------------------------------------------------------------------------------------------
// INT4 dequantisation (reference-exact), used for large batches and machines without AVX512-BF16.

template <typename T>
void int4_dequant_rows(const Int4View& v, int64_t n0, int64_t n1, T* out) {
  float row[64];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = v.qrow(n);
    const int64_t step = v.qstep(n);
    T* o = out + n * v.Kp;
    for (int64_t b = 0; b < v.Kp / 64; ++b) {
      for (int j = 0; j < 32; ++j) {
        row[j] = float(q[b * step + j] & 0xF);
        row[32 + j] = float(q[b * step + j] >> 4);
      }
      for (int j = 0; j < 64; ++j) {
        const int64_t k = b * 64 + j, g = k / v.G;
        const float s = half_to_float(v.sc[v.sidx(n, g)]);
        const float z = v.z ? float(v.z[v.sidx(n, g)]) : 8.0f;
        o[k] = T(s * (row[j] - z));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// INT4 x BF16 activations: MT activation rows x NT weight rows per tile.
//
// Per 64 weights of a row: vpmovzxbw (32 packed bytes -> 32 words), vpsrlw, 2x vpermw through a
// 32-entry table of bf16 (q - z) (entries i and i + 16 equal, so the low nibble needs no mask), then
// per group a vdpbf16ps into a fresh register and an FMA with the group's fp32 scale, broadcast from a
// per-tile buffer. Symmetric weights use one constant table (z = 8); asymmetric ones pick one of 16
// tables by the group's zero point.

constexpr int kScaleChunk = 256;  // groups of scales converted to fp32 at a time, per weight row
// Software prefetch distance along a thread's (sequential) stream of weight bytes.
constexpr int64_t kPrefetchBytes = 2048;


struct Int4Tables {
  alignas(64) uint16_t bf16[16][32];  // bf16(q - z) for z = 0..15
  alignas(64) float f32[16][16];      // (q - z) for z = 0..15
  Int4Tables() {
    for (int z = 0; z < 16; ++z)
      for (int i = 0; i < 32; ++i) {
        const float v = float((i & 15) - z);
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof(bits));
        bf16[z][i] = uint16_t(bits >> 16);  // small integers are exact in bf16
        if (i < 16) f32[z][i] = v;
      }
  }
};
const Int4Tables kTables;

// Scales of groups [g0, g0 + count) for the call's rows, as fp32: out[(g - g0) * stride + roff + i] is row
// n0 + i's. Tiled rows convert their tile's contiguous [group][4] block; a tail row its own run.
FRUGAL_AVX512 inline void load_scales(const Int4View& v, int64_t n0, int64_t g0, int64_t count, float* out,
                                      int64_t& stride, int64_t& roff) {
  const bool tiled = n0 < v.N4;
  stride = tiled ? 4 : 1;
  roff = tiled ? n0 % 4 : 0;
  const uint16_t* src = v.sc + (tiled ? (n0 / 4) * 4 * v.lds + g0 * 4 : n0 * v.lds + g0);
  const int64_t total = count * stride;
  int64_t i = 0;
  for (; i + 16 <= total; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < total; ++i) out[i] = _cvtsh_ss(src[i]);
}

template <int MT, int NT, int G>
FRUGAL_AVX512 void int4_tile_bf16(const Int4View& v, const uint16_t* x, int64_t ldx, int64_t n0, const Out& out,
                                  int64_t m0) {
  const int64_t nblocks = v.Kp / 64;
  const __m512i sym_table = _mm512_load_si512(kTables.bf16[8]);
  __m512 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) acc[m][n] = _mm512_setzero_ps();
  const uint8_t* rows[NT];
  for (int n = 0; n < NT; ++n) rows[n] = v.qrow(n0 + n);
  const int64_t step = v.qstep(n0);
  float sc[4 * kScaleChunk];
  int64_t sstride = 1, roff = 0;
  constexpr int64_t blocks_per_chunk = int64_t(kScaleChunk) * G / 64;
  for (int64_t c0 = 0; c0 < nblocks; c0 += blocks_per_chunk) {
    const int64_t c1 = std::min(nblocks, c0 + blocks_per_chunk), g0 = c0 * 64 / G;
    load_scales(v, n0, g0, std::min<int64_t>(kScaleChunk, v.lds - g0), sc, sstride, roff);
    for (int64_t b = c0; b < c1; ++b) {
      // Groups of the two 32-weight halves of this block (the same group unless G == 32).
      const int64_t g_lo = (b * 64) / G, g_hi = (b * 64 + 32) / G;
      __m512i w_lo[NT], w_hi[NT];
      for (int n = 0; n < NT; ++n) {
        const uint8_t* src = rows[n] + b * step;
        if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes), _MM_HINT_T1);
        const __m512i raw = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
        const __m512i hi = _mm512_srli_epi16(raw, 4);
        if (v.z) {
          w_lo[n] = _mm512_permutexvar_epi16(raw, _mm512_load_si512(kTables.bf16[v.z[v.sidx(n0 + n, g_lo)] & 15]));
          w_hi[n] = _mm512_permutexvar_epi16(hi, _mm512_load_si512(kTables.bf16[v.z[v.sidx(n0 + n, g_hi)] & 15]));
        } else {
          w_lo[n] = _mm512_permutexvar_epi16(raw, sym_table);
          w_hi[n] = _mm512_permutexvar_epi16(hi, sym_table);
        }
      }
      for (int m = 0; m < MT; ++m) {
        const __m512i x_lo = _mm512_loadu_si512(x + m * ldx + b * 64);
        const __m512i x_hi = _mm512_loadu_si512(x + m * ldx + b * 64 + 32);
        for (int n = 0; n < NT; ++n) {
          if constexpr (G == 32) {
            const __m512 d_lo = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w_lo[n], (__m512bh)x_lo);
            const __m512 d_hi = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w_hi[n], (__m512bh)x_hi);
            acc[m][n] = _mm512_fmadd_ps(d_lo, _mm512_set1_ps(sc[(g_lo - g0) * sstride + roff + n]), acc[m][n]);
            acc[m][n] = _mm512_fmadd_ps(d_hi, _mm512_set1_ps(sc[(g_hi - g0) * sstride + roff + n]), acc[m][n]);
          } else {
            __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w_lo[n], (__m512bh)x_lo);
            d = _mm512_dpbf16_ps(d, (__m512bh)w_hi[n], (__m512bh)x_hi);
            acc[m][n] = _mm512_fmadd_ps(d, _mm512_set1_ps(sc[(g_lo - g0) * sstride + roff + n]), acc[m][n]);
          }
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) out.store(m0 + m, n0 + n, _mm512_reduce_add_ps(acc[m][n]));
}

// INT4 x FP32 activations: 16-entry fp32 tables of (q - z); vpermps reads the low 4 bits of each index.
template <int MT, int NT, int G>
FRUGAL_AVX512 void int4_tile_f32(const Int4View& v, const float* x, int64_t ldx, int64_t n0, const Out& out,
                                 int64_t m0) {
  const int64_t nblocks = v.Kp / 64;
  const __m512 sym_table = _mm512_load_ps(kTables.f32[8]);
  __m512 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) acc[m][n] = _mm512_setzero_ps();
  const uint8_t* rows[NT];
  for (int n = 0; n < NT; ++n) rows[n] = v.qrow(n0 + n);
  const int64_t step = v.qstep(n0);
  float sc[4 * kScaleChunk];
  int64_t sstride = 1, roff = 0;
  constexpr int64_t blocks_per_chunk = int64_t(kScaleChunk) * G / 64;
  for (int64_t c0 = 0; c0 < nblocks; c0 += blocks_per_chunk) {
    const int64_t c1 = std::min(nblocks, c0 + blocks_per_chunk), g0 = c0 * 64 / G;
    load_scales(v, n0, g0, std::min<int64_t>(kScaleChunk, v.lds - g0), sc, sstride, roff);
    for (int64_t b = c0; b < c1; ++b) {
      const int64_t g_lo = (b * 64) / G, g_hi = (b * 64 + 32) / G;
      __m512 w[NT][4];  // weights +0..15, +16..31, +32..47, +48..63 of the block, as (q - z)
      for (int n = 0; n < NT; ++n) {
        __m512 t_lo = sym_table, t_hi = sym_table;
        if (v.z) {
          t_lo = _mm512_load_ps(kTables.f32[v.z[v.sidx(n0 + n, g_lo)] & 15]);
          t_hi = _mm512_load_ps(kTables.f32[v.z[v.sidx(n0 + n, g_hi)] & 15]);
        }
        const uint8_t* src = rows[n] + b * step;
        if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes), _MM_HINT_T1);
        const __m512i r0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        const __m512i r1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16)));
        w[n][0] = _mm512_permutexvar_ps(r0, t_lo);
        w[n][1] = _mm512_permutexvar_ps(r1, t_lo);
        w[n][2] = _mm512_permutexvar_ps(_mm512_srli_epi32(r0, 4), t_hi);
        w[n][3] = _mm512_permutexvar_ps(_mm512_srli_epi32(r1, 4), t_hi);
      }
      for (int m = 0; m < MT; ++m) {
        const float* xb = x + m * ldx + b * 64;
        const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        const __m512 x2 = _mm512_loadu_ps(xb + 32), x3 = _mm512_loadu_ps(xb + 48);
        for (int n = 0; n < NT; ++n) {
          __m512 d_lo = _mm512_fmadd_ps(w[n][1], x1, _mm512_mul_ps(w[n][0], x0));
          __m512 d_hi = _mm512_fmadd_ps(w[n][3], x3, _mm512_mul_ps(w[n][2], x2));
          if constexpr (G == 32) {
            acc[m][n] = _mm512_fmadd_ps(d_lo, _mm512_set1_ps(sc[(g_lo - g0) * sstride + roff + n]), acc[m][n]);
            acc[m][n] = _mm512_fmadd_ps(d_hi, _mm512_set1_ps(sc[(g_hi - g0) * sstride + roff + n]), acc[m][n]);
          } else {
            acc[m][n] = _mm512_fmadd_ps(_mm512_add_ps(d_lo, d_hi), _mm512_set1_ps(sc[(g_lo - g0) * sstride + roff + n]),
                                        acc[m][n]);
          }
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) out.store(m0 + m, n0 + n, _mm512_reduce_add_ps(acc[m][n]));
}

template <int G>
void int4_gemv(const at::Tensor& x, const Int4View& v, const Out& o) {
  const int64_t M = x.size(0), Kp = x.size(1), N = v.N;
  if (x.scalar_type() == at::kBFloat16) {
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    run_tiles(
        M, N, N * Kp / 2,
        [&](int64_t m, int64_t n0) { int4_tile_bf16<1, kTileRows, G>(v, xp + m * Kp, Kp, n0, o, m); },
        [&](int64_t m, int64_t n0) { int4_tile_bf16<kTileBatch, kTileRows / 2, G>(v, xp + m * Kp, Kp, n0, o, m);
                                     int4_tile_bf16<kTileBatch, kTileRows / 2, G>(v, xp + m * Kp, Kp, n0 + 2, o, m); },
        [&](int64_t m, int64_t n) { int4_tile_bf16<1, 1, G>(v, xp + m * Kp, Kp, n, o, m); });
  } else {
    const float* xp = x.data_ptr<float>();
    run_tiles(
        M, N, N * Kp / 2,
        [&](int64_t m, int64_t n0) { int4_tile_f32<1, kTileRows, G>(v, xp + m * Kp, Kp, n0, o, m); },
        [&](int64_t m, int64_t n0) { int4_tile_f32<kTileBatch, kTileRows / 2, G>(v, xp + m * Kp, Kp, n0, o, m);
                                     int4_tile_f32<kTileBatch, kTileRows / 2, G>(v, xp + m * Kp, Kp, n0 + 2, o, m); },
        [&](int64_t m, int64_t n) { int4_tile_f32<1, 1, G>(v, xp + m * Kp, Kp, n, o, m); });
  }
}

}  // namespace

// Dequantise INT4 kernel-layout weights to [N, Kp] of `dtype` (reference values).
at::Tensor int4_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zeros, int64_t group_size, at::ScalarType dtype) {
  const int64_t N = qweight.size(0), Kp = qweight.size(1) * 2;
  TORCH_CHECK(Kp % 64 == 0, "packed K must be a multiple of 64, got ", Kp);
  const uint8_t* z = zeros.has_value() && zeros->defined() ? zeros->data_ptr<uint8_t>() : nullptr;
  at::Tensor out = at::empty({N, Kp}, qweight.options().dtype(dtype));
  const Int4View v(qweight.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), z, N,
                   Kp, group_size);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (dtype == at::kBFloat16)
      int4_dequant_rows(v, n0, n1, out.data_ptr<at::BFloat16>());
    else if (dtype == at::kHalf)
      int4_dequant_rows(v, n0, n1, out.data_ptr<at::Half>());
    else
      int4_dequant_rows(v, n0, n1, out.data_ptr<float>());
  });
  return out;
}

// y = x @ dequant(W)^T (+ bias). x [M, K<=Kp]; returns [M, N] in x's dtype.
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& zeros, int64_t group_size,
                       const c10::optional<at::Tensor>& bias, int64_t max_gemv_rows) {
  check_common(x_in, at::kByte, qweight);
  const int64_t Kp = qweight.size(1) * 2, N = qweight.size(0), M = x_in.size(0);
  const bool has_zeros = check_int4_params(scales, zeros, N, Kp, group_size);
  const at::Tensor x = pad_k(x_in, Kp);
  if (M > max_gemv_rows || !cpu_has_avx512_bf16())
    return blas_linear(x, int4_dequantize(qweight, scales, zeros, group_size, x.scalar_type()), bias);
  at::Tensor out = at::empty({M, N}, x.options()), bias_f32;
  const Out o = make_out(out, bias_f32, bias, nullptr);
  const Int4View v(qweight.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                   has_zeros ? zeros->data_ptr<uint8_t>() : nullptr, N, Kp, group_size);
  switch (group_size) {
    case 32: int4_gemv<32>(x, v, o); break;
    case 64: int4_gemv<64>(x, v, o); break;
    default: int4_gemv<128>(x, v, o); break;
  }
  return out;
}

}  // namespace frugal
