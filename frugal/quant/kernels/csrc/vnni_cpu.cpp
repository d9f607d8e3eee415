// Weight-only INT4 and INT8 x INT8-rounded activations with AVX512-VNNI (vpdpbusd): the "x16" kernels.
//
// The bf16/fp32-activation kernels (int4_cpu.cpp, dense_cpu.cpp) spend several vector ops per weight
// byte (widen, table lookup or convert, dot, scale FMA) and are compute-bound on one core: INT4 at
// 19 GB/s in cache against a 26 GB/s read probe. Here activations are quantized once per call to INT8 in
// blocks of 32 (x ~ d_b * xq, d_b = max|x| / 127, xq = round-half-even(x / d_b), llama.cpp's Q8_0), so
// one vpdpbusd multiplies 64 weights by their activations and sums them exactly in int32:
//
//   INT4: y[m, n] = sum_b d_b[m] * s[n, g(b)] * (sum_{k in b} q[n, k] * xq[m, k] - z[n, g(b)] * sum_{k in b} xq[m, k])
//   INT8: y[m, n] = s[n] * sum_b d_b[m] * sum_{k in b} q[n, k] * xq[m, k]
//         (vpdpbusd takes unsigned x signed bytes: |q| times xq with q's sign moved onto xq)
//
// Only the activation rounding differs from the dequantized oracle; with the oracle fed the same rounded
// activations (frugal.quant.int4.round_activations_int8) they agree to fp32 summation order.
//
// Layouts "x16" (repacked at load from the checkpoint layout, same sizes; N % 16 == 0): rows in tiles of
// 16; tile t is one contiguous run of 64-byte steps, step s holding 4 bytes per row (bytes 4i .. 4i+3 are
// row 16t + i's), so one 512-bit load feeds the 16 lanes of vpdpbusd with 16 rows.
//   INT4 (Kp % 64 == 0): byte j of step s holds weight 8s + j (low nibble) and 8s + 4 + j (high nibble);
//   scales [N, ceil(Kp / G)] float16 and zeros (uint8, absent for symmetric: z = 8) stored per tile as
//   [group][16 rows].
//   INT8 (K % 32 == 0): step s holds weights 4s .. 4s+3; scales float32 [N] stay row-major.
#include "common.h"

#define FRUGAL_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

namespace frugal {

inline bool cpu_has_avx512_vnni() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
}

namespace {

constexpr int kBlock = 32;       // activation quantization block (input features)
constexpr int kRowsPerTile = 16;
// Software prefetch distance along a thread's sequential weight stream; measured on Zen 4 with 2 threads
// (TinyLlama decode shapes): none 29.8-30.2 GB/s, 4 KiB ahead 30.6-31.4, 8 KiB 29.9-30.7, 16 KiB 29.3-30.1.
constexpr int64_t kVnniPrefetchBytes = 4096;
// Since each thread reads one contiguous range (WorkSharing::run_streams), INT4 matrices of 2 MiB and more
// stream faster with twice the distance: same-process A/B over TinyLlama's from DRAM (Zen 4, 2 threads)
// 11264 x 2048 paired ratio 0.94, 2560 x 2048 0.92, 2048 x 5632 0.98; SmolLM2's 0.2-1 MB ones 2-7% slower.
constexpr int64_t kLongStreamBytes = 2 << 20;
// Weight bytes from which a call shares its tiles with the helper threads. These kernels have compute to
// spare, so a second thread pays off on smaller layers than in int4_cpu.cpp: SmolLM2-135M's 120 decode
// projections (2 threads, one-off sweep) took 2.49 ms at 512 KiB, 2.10 at 256, 1.95 at 128, 2.08 at 64.
constexpr int64_t kX16ParallelMinBytes = 128 * 1024;

// Activations quantized per 32-block: q [M, Kp] int8, d [M, Kp/32] fp32 scales, sum [M, Kp/32] int32.
struct Q8Rows {
  at::Tensor q, d, sum;
};

template <typename T>
FRUGAL_VNNI inline __m512 load16(const T* p);
template <>
FRUGAL_VNNI inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
FRUGAL_VNNI inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

template <typename T>
FRUGAL_VNNI void quantize_rows(const T* x, int64_t M, int64_t Kp, int8_t* q, float* d, int32_t* sum) {
  const int64_t nb = Kp / kBlock;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const T* src = x + m * Kp + b * kBlock;
      const __m512 v0 = load16(src), v1 = load16(src + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float scale = amax / 127.0f;
      const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
      const __m512 vinv = _mm512_set1_ps(inv);
      // _mm512_cvtps_epi32 rounds half to even under the default MXCSR, as torch.round does.
      const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vinv));
      const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vinv));
      int8_t* dst = q + m * Kp + b * kBlock;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(i0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(i1));
      d[m * nb + b] = scale;
      sum[m * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
}

Q8Rows quantize_activations(const at::Tensor& x) {
  const int64_t M = x.size(0), Kp = x.size(1), nb = Kp / kBlock;
  Q8Rows r{at::empty({M, Kp}, x.options().dtype(at::kChar)), at::empty({M, nb}, x.options().dtype(at::kFloat)),
           at::empty({M, nb}, x.options().dtype(at::kInt))};
  if (x.scalar_type() == at::kBFloat16)
    quantize_rows(x.data_ptr<at::BFloat16>(), M, Kp, r.q.data_ptr<int8_t>(), r.d.data_ptr<float>(), r.sum.data_ptr<int32_t>());
  else
    quantize_rows(x.data_ptr<float>(), M, Kp, r.q.data_ptr<int8_t>(), r.d.data_ptr<float>(), r.sum.data_ptr<int32_t>());
  return r;
}

// One tile of 16 weight rows against MT activation rows (m0 ..).
template <int MT>
FRUGAL_VNNI void tile_x16(const uint8_t* qw, const uint16_t* sc, const uint8_t* zp, int64_t Kp, int64_t G,
                          const int8_t* xq, const float* xd, const int32_t* xs, int64_t m0, int64_t n0,
                          const Out& out, int64_t prefetch_bytes) {
  const int64_t nb = Kp / kBlock;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g = b * kBlock / G;
    const uint8_t* src = qw + b * 4 * 64;  // 4 steps of 8 weights per 32-block
    for (int line = 0; line < 4; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(src + prefetch_bytes + 64 * line), _MM_HINT_T2);
    __m512i lo_acc[MT], hi_acc[MT];
    for (int m = 0; m < MT; ++m) lo_acc[m] = hi_acc[m] = _mm512_setzero_si512();
    for (int s = 0; s < 4; ++s) {
      const __m512i raw = _mm512_loadu_si512(src + s * 64);
      const __m512i lo = _mm512_and_si512(raw, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      for (int m = 0; m < MT; ++m) {
        const int32_t* xk = reinterpret_cast<const int32_t*>(xq + (m0 + m) * Kp + b * kBlock + s * 8);
        lo_acc[m] = _mm512_dpbusd_epi32(lo_acc[m], lo, _mm512_set1_epi32(xk[0]));
        hi_acc[m] = _mm512_dpbusd_epi32(hi_acc[m], hi, _mm512_set1_epi32(xk[1]));
      }
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * kRowsPerTile)));
    __m512i zero_point = _mm512_set1_epi32(8);
    if (zp) zero_point = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + g * kRowsPerTile)));
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * nb + b;
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(lo_acc[m], hi_acc[m]),
                                           _mm512_mullo_epi32(zero_point, _mm512_set1_epi32(xs[i])));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(xd[i])), acc[m]);
    }
  }
  alignas(64) float lanes[kRowsPerTile];
  for (int m = 0; m < MT; ++m) {
    _mm512_store_ps(lanes, acc[m]);
    for (int i = 0; i < kRowsPerTile; ++i) out.store(m0 + m, n0 + i, lanes[i]);
  }
}

void dequant_x16_tile(const uint8_t* qw, const uint16_t* sc, const uint8_t* zp, int64_t Kp, int64_t G, float* row_out,
                      int64_t i) {
  // Row i of a tile -> row_out[Kp] fp32 (reference values s * (q - z)).
  for (int64_t s = 0; s < Kp / 8; ++s) {
    const uint8_t* bytes = qw + s * 64 + i * 4;
    const int64_t g = s * 8 / G;
    const float scale = half_to_float(sc[g * kRowsPerTile + i]);
    const float z = zp ? float(zp[g * kRowsPerTile + i]) : 8.0f;
    for (int j = 0; j < 4; ++j) {
      row_out[s * 8 + j] = scale * (float(bytes[j] & 0xF) - z);
      row_out[s * 8 + 4 + j] = scale * (float(bytes[j] >> 4) - z);
    }
  }
}

}  // namespace

// Dequantise x16-layout INT4 weights to [N, Kp] of `dtype` (reference values).
at::Tensor int4_x16_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                               const c10::optional<at::Tensor>& zeros, int64_t group_size, at::ScalarType dtype) {
  const int64_t N = qweight.size(0), Kp = qweight.size(1) * 2, lds = scales.size(1);
  TORCH_CHECK(N % kRowsPerTile == 0 && Kp % 64 == 0, "x16 layout needs N % 16 == 0 and Kp % 64 == 0");
  const uint8_t* z = zeros.has_value() && zeros->defined() ? zeros->data_ptr<uint8_t>() : nullptr;
  at::Tensor out = at::empty({N, Kp}, qweight.options().dtype(dtype));
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  at::parallel_for(0, N / kRowsPerTile, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> row(Kp);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < kRowsPerTile; ++i) {
        dequant_x16_tile(qw + t * kRowsPerTile * (Kp / 2), sc + t * kRowsPerTile * lds,
                         z ? z + t * kRowsPerTile * lds : nullptr, Kp, group_size, row.data(), i);
        const int64_t n = t * kRowsPerTile + i;
        if (dtype == at::kFloat)
          std::copy(row.begin(), row.end(), out.data_ptr<float>() + n * Kp);
        else if (dtype == at::kBFloat16)
          std::transform(row.begin(), row.end(), out.data_ptr<at::BFloat16>() + n * Kp,
                         [](float v) { return at::BFloat16(v); });
        else
          std::transform(row.begin(), row.end(), out.data_ptr<at::Half>() + n * Kp, [](float v) { return at::Half(v); });
      }
  });
  return out;
}

// y = x @ W^T (+ bias) with x rounded to INT8 per 32-block; x [M, K<=Kp] bf16/fp32, W in the x16 layout.
// Batches above `max_gemv_rows` dequantise W and call the BLAS with unrounded activations.
at::Tensor int4_x16_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zeros, int64_t group_size,
                           const c10::optional<at::Tensor>& bias, int64_t max_gemv_rows) {
  check_common(x_in, at::kByte, qweight);
  const int64_t Kp = qweight.size(1) * 2, N = qweight.size(0), M = x_in.size(0), lds = (Kp + group_size - 1) / group_size;
  TORCH_CHECK(N % kRowsPerTile == 0, "x16 layout needs N % 16 == 0");
  const bool has_zeros = check_int4_params(scales, zeros, N, Kp, group_size);
  const at::Tensor x = pad_k(x_in, Kp);
  if (M > max_gemv_rows || !cpu_has_avx512_vnni())
    return blas_linear(x, int4_x16_dequantize(qweight, scales, zeros, group_size, x.scalar_type()), bias);
  const Q8Rows a = quantize_activations(x);
  at::Tensor y = at::empty({M, N}, x.options()), bias_f32;
  const Out o = make_out(y, bias_f32, bias, nullptr);
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint8_t* zp = has_zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xd = a.d.data_ptr<float>();
  const int32_t* xs = a.sum.data_ptr<int32_t>();
  const int64_t num_tiles = N / kRowsPerTile, tile_bytes = kRowsPerTile * Kp / 2;
  constexpr int64_t kTilesPerChunk = 4;  // 64 output rows: 64 KiB of weights at K = 2048
  const int64_t num_chunks = (num_tiles + kTilesPerChunk - 1) / kTilesPerChunk;
  const bool share = N * Kp / 2 >= kX16ParallelMinBytes;
  const int64_t prefetch = N * Kp / 2 >= kLongStreamBytes ? 2 * kVnniPrefetchBytes : kVnniPrefetchBytes;
  WorkSharing::instance().run_streams(share ? num_chunks : -num_chunks, [&](int64_t chunk) {
    for (int64_t t = chunk * kTilesPerChunk; t < std::min(num_tiles, (chunk + 1) * kTilesPerChunk); ++t) {
      const uint8_t* tq = qw + t * tile_bytes;
      const uint16_t* ts = sc + t * kRowsPerTile * lds;
      const uint8_t* tz = zp ? zp + t * kRowsPerTile * lds : nullptr;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) tile_x16<4>(tq, ts, tz, Kp, group_size, xq, xd, xs, m, t * kRowsPerTile, o, prefetch);
      for (; m < M; ++m) tile_x16<1>(tq, ts, tz, Kp, group_size, xq, xd, xs, m, t * kRowsPerTile, o, prefetch);
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------------------
// INT8 weights (per output channel) in the x16 layout.

namespace {

template <int MT>
FRUGAL_VNNI void tile_x16_int8(const int8_t* qw, const float* row_scales, int64_t K, const int8_t* xq,
                               const float* xd, int64_t m0, int64_t n0, const Out& out) {
  const int64_t nb = K / kBlock;
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* src = qw + b * 8 * 64;  // 8 steps of 4 weights per 32-block
    for (int line = 0; line < 8; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(src + 2 * kVnniPrefetchBytes + 64 * line), _MM_HINT_T2);
    __m512i dot[MT];
    for (int m = 0; m < MT; ++m) dot[m] = zero;
    for (int s = 0; s < 8; ++s) {
      const __m512i raw = _mm512_loadu_si512(src + s * 64);
      const __m512i magnitude = _mm512_abs_epi8(raw);
      const __mmask64 negative = _mm512_movepi8_mask(raw);
      for (int m = 0; m < MT; ++m) {
        const __m512i xv = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(xq + (m0 + m) * K + b * kBlock)[s]);
        dot[m] = _mm512_dpbusd_epi32(dot[m], magnitude, _mm512_mask_sub_epi8(xv, negative, zero, xv));
      }
    }
    for (int m = 0; m < MT; ++m)
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), _mm512_set1_ps(xd[(m0 + m) * nb + b]), acc[m]);
  }
  const __m512 scale = _mm512_loadu_ps(row_scales + n0);
  alignas(64) float lanes[kRowsPerTile];
  for (int m = 0; m < MT; ++m) {
    _mm512_store_ps(lanes, _mm512_mul_ps(acc[m], scale));
    for (int i = 0; i < kRowsPerTile; ++i) out.store(m0 + m, n0 + i, lanes[i]);
  }
}

}  // namespace

// y = (x @ qweight^T) * scales (+ bias) with x rounded to INT8 per 32-block; qweight int8 [N, K] in the x16
// layout, scales float32 [N]. Batches above `max_gemv_rows` dequantise for the BLAS (exact activations).
at::Tensor int8_x16_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& bias, int64_t max_gemv_rows) {
  check_common(x_in, at::kChar, qweight);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "activation has ", K, " features, weight has ", qweight.size(1));
  TORCH_CHECK(N % kRowsPerTile == 0 && K % kBlock == 0, "x16 layout needs N % 16 == 0 and K % 32 == 0");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "scales must be contiguous float32 [N]");
  const at::Tensor x = x_in.contiguous();
  if (M > max_gemv_rows || !cpu_has_avx512_vnni()) {
    // Undo the tiling: [tile, step, row, 4] -> [tile, row, step, 4].
    at::Tensor w = qweight.view({N / kRowsPerTile, K / 4, kRowsPerTile, 4}).transpose(1, 2).reshape({N, K});
    return blas_linear(x, w.to(at::kFloat).mul_(scales.unsqueeze(1)).to(x.scalar_type()), bias);  // s * q exact in fp32
  }
  const Q8Rows a = quantize_activations(x);
  at::Tensor y = at::empty({M, N}, x.options()), bias_f32;
  const Out o = make_out(y, bias_f32, bias, nullptr);
  const int8_t* qw = qweight.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xd = a.d.data_ptr<float>();
  const int64_t num_tiles = N / kRowsPerTile, tile_bytes = kRowsPerTile * K;
  constexpr int64_t kTilesPerChunk = 2;  // 32 output rows: 64 KiB of weights at K = 2048
  const int64_t num_chunks = (num_tiles + kTilesPerChunk - 1) / kTilesPerChunk;
  const bool share = N * K >= kX16ParallelMinBytes;
  WorkSharing::instance().run_streams(share ? num_chunks : -num_chunks, [&](int64_t chunk) {
    for (int64_t t = chunk * kTilesPerChunk; t < std::min(num_tiles, (chunk + 1) * kTilesPerChunk); ++t) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) tile_x16_int8<4>(qw + t * tile_bytes, sc, K, xq, xd, m, t * kRowsPerTile, o);
      for (; m < M; ++m) tile_x16_int8<1>(qw + t * tile_bytes, sc, K, xq, xd, m, t * kRowsPerTile, o);
    }
  });
  return y;
}

bool has_vnni_path() { return cpu_has_avx512_vnni(); }

}  // namespace frugal
