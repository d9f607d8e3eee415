// Paged attention for decode rows (one query token per request) on the CPU, behind
// torch.ops.frugal.paged_attention_decode and the native decode step:
//
//   query [B, H, D], kv_cache [2, num_blocks, block_size, Hkv, D], block_tables [B, max_blocks] int64,
//   seq_lens [B] int64 -> out [B, H, D]
//
// Request b attends to positions [start, seq_lens[b]), start = seq_len - sliding_window when a window is
// set (> 0).
//
// Work is split by position, as in flash-decoding (Dao et al., "Flash-Decoding for long-context
// inference", 2023): one work item is one request's chunk of kChunk positions, for all its heads. An
// item leaves per head the chunk's max score m, its sum of exponentials l and the unnormalised sum of
// exp-weighted V rows; the chunks of a head are then merged in order. Splitting by position instead of by
// KV head keeps both threads busy whatever Hkv is (3 on SmolLM2, with 2 threads one thread used to do
// two heads) and a single long request still uses every thread. Chunk boundaries depend only on the
// request's own positions, never on the thread count or the batch, so neither does the output.
//
// No software prefetch: the row prefetches these loops had never reached the binary (GCC 12 drops
// _mm_prefetch of an address loaded from memory here; objdump showed none), and made to stay (inline asm),
// alone or with whole-row walks and a prefetch one 16-position block ahead, they moved a call over 576
// positions by -10% to +9% depending on shape and cache state (same-process A/B, Zen 4): not kept.
//
// Per head group the K phase reduces 16 positions' dot products at once (hsum16); on bf16 caches with
// AVX512-BF16 it multiplies the bf16 query and cached K pairs directly (vdpbf16ps). Scores, softmax and
// the V accumulation are fp32. On CPUs with AMX-BF16, bf16 caches with head_dim 32/64/128 and 4 to 16
// query heads per KV head run both products on tiles instead (decode_attention_amx.cpp; the V product
// then takes the softmax weights in bf16); FRUGAL_NO_AMX=1 or set_amx_attention(False) keeps AVX-512.
#include <torch/extension.h>
#include <immintrin.h>

#include "decode_attention_amx.h"
#include "kernel_ops.h"
#include "simd_math.h"
#include "work_sharing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

namespace {

using frugal::simd::exp16;
using frugal::simd::has_avx512;
using frugal::simd::load16;

#define FRUGAL_AVX512 FRUGAL_SIMD_AVX512
#define FRUGAL_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// Positions per work item. 64, not 128: a 576-position request makes 9 items, not 5, for 2 threads to share
// (TinyLlama-shaped layer with its cache in L2, 2 threads: 86 -> 70 us; /tmp attention microbenchmark).
constexpr int64_t kChunk = 64;

// One KV head's query group over positions [start, end) of one request.
struct GroupArgs {
  const float* q;              // [G, D]
  const at::BFloat16* q_bf16;  // [G, D], the same values (bf16 caches with AVX512-BF16), else null
  int64_t G, D;
  const int64_t* slots;  // [end - start]: element offset of each position's token row in the cache
  int64_t start, end;
  float scale;
  float* scores;  // [G, end - start]: scores, then exp(score - m)
  float* acc;     // [G, D]: sum over positions of exp(score - m) * v
  int64_t slot(int64_t p) const { return slots[p - start]; }
};

// The cache offsets of positions [start, end), walking the block table once.
void position_offsets(const int64_t* table, int64_t block_size, int64_t block_stride, int64_t token_stride,
                      int64_t start, int64_t end, std::vector<int64_t>& slots) {
  slots.resize(std::max<int64_t>(end - start, 0));
  int64_t p = start;
  for (int64_t block = start / block_size; p < end; ++block) {
    const int64_t base = table[block] * block_stride;
    for (int64_t within = p - block * block_size; within < block_size && p < end; ++within, ++p)
      slots[p - start] = base + within * token_stride;
  }
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// ---- K phase: scores[g][p] = scale * q_g . k_p --------------------------------------------------

template <typename T>
void scores_scalar(const GroupArgs& a, const T* k_base) {
  const int64_t L = a.end - a.start;
  for (int64_t p = a.start; p < a.end; ++p) {
    const T* k = k_base + a.slot(p);
    for (int64_t g = 0; g < a.G; ++g) {
      float dot = 0.f;
      for (int64_t i = 0; i < a.D; ++i) dot += a.q[g * a.D + i] * to_float(k[i]);
      a.scores[g * L + (p - a.start)] = dot * a.scale;
    }
  }
}

template <typename T>
FRUGAL_AVX512 void scores_avx512(const GroupArgs& a, const T* k_base) {  // any D % 16 == 0
  const int64_t L = a.end - a.start;
  for (int64_t p = a.start; p < a.end; ++p) {
    const T* k = k_base + a.slot(p);
    for (int64_t g = 0; g < a.G; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < a.D; i += 16)
        sum = _mm512_fmadd_ps(_mm512_loadu_ps(a.q + g * a.D + i), load16(k + i), sum);
      a.scores[g * L + (p - a.start)] = _mm512_reduce_add_ps(sum) * a.scale;
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

// scores[g][c0 .. c0 + n) = scale * the lane sums of dots[0 .. n).
FRUGAL_AVX512 inline void store_scores16(const GroupArgs& a, int64_t g, int64_t c0, int n, const __m512* dots) {
  const __m512 sums = _mm512_mul_ps(hsum16(dots), _mm512_set1_ps(a.scale));
  _mm512_mask_storeu_ps(a.scores + g * (a.end - a.start) + (c0 - a.start), (__mmask16)((1u << n) - 1), sums);
}

// D = 16 * ND: 16 positions at a time, their rows converted to fp32 once, one head's 16 dot products
// reduced together by hsum16.
template <typename T, int ND>
FRUGAL_AVX512 void scores_blocked(const GroupArgs& a, const T* k_base) {
  constexpr int D = 16 * ND;
  alignas(64) float kbuf[16][D];
  for (int64_t c0 = a.start; c0 < a.end; c0 += 16) {
    const int n = int(std::min<int64_t>(16, a.end - c0));
    for (int j = 0; j < n; ++j) {
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
      store_scores16(a, g, c0, n, dots);
    }
  }
}

// bf16 caches on AVX512-BF16: vdpbf16ps straight from the cached rows and the (bf16) query, two products
// per lane per instruction and no conversion; one head's 16 dot products reduced by hsum16.
template <int ND>
FRUGAL_AVX512_BF16 void scores_blocked_bf16dp(const GroupArgs& a, const at::BFloat16* k_base) {
  constexpr int D = 16 * ND, NP = D / 32;
  static_assert(D % 32 == 0, "32 bf16 values per vdpbf16ps");
  for (int64_t c0 = a.start; c0 < a.end; c0 += 16) {
    const int n = int(std::min<int64_t>(16, a.end - c0));
    const at::BFloat16* rows[16];
    for (int j = 0; j < n; ++j) {
      rows[j] = k_base + a.slot(c0 + j);
    }
    for (int64_t g = 0; g < a.G; ++g) {
      __m512i qv[NP];
      for (int i = 0; i < NP; ++i) qv[i] = _mm512_loadu_si512(a.q_bf16 + g * D + 32 * i);
      __m512 dots[16];
      for (int j = 0; j < 16; ++j) {
        __m512 acc = _mm512_setzero_ps();
        if (j < n)
          for (int i = 0; i < NP; ++i)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(rows[j] + 32 * i), (__m512bh)qv[i]);
        dots[j] = acc;
      }
      store_scores16(a, g, c0, n, dots);
    }
  }
}

// ---- softmax numerators: scores -> exp(scores - m) in place; m and l = sum of the exponentials ------

FRUGAL_AVX512 void exp_rows_avx512(float* scores, int64_t G, int64_t L, float* m_out, float* l_out) {
  const int64_t full = L / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (L - full)) - 1);
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * L;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < full; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + i));
    mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, s + full));
    const float m = _mm512_reduce_max_ps(mx);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < full; i += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), mv));
      _mm512_storeu_ps(s + i, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (tail) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + full), mv));
      _mm512_mask_storeu_ps(s + full, tail, e);
      sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    m_out[g] = m;
    l_out[g] = _mm512_reduce_add_ps(sum);
  }
}

void exp_rows(float* scores, int64_t G, int64_t L, float* m_out, float* l_out) {
  if (has_avx512()) return exp_rows_avx512(scores, G, L, m_out, l_out);
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * L;
    float m = -std::numeric_limits<float>::infinity(), total = 0.f;
    for (int64_t i = 0; i < L; ++i) m = std::max(m, s[i]);
    for (int64_t i = 0; i < L; ++i) s[i] = std::exp(s[i] - m);
    for (int64_t i = 0; i < L; ++i) total += s[i];
    m_out[g] = m;
    l_out[g] = total;
  }
}

// ---- V phase: acc[g] = sum_p scores[g][p] * v_p --------------------------------------------------

template <typename T>
void values_scalar(const GroupArgs& a, const T* v_base) {
  const int64_t L = a.end - a.start;
  std::fill(a.acc, a.acc + a.G * a.D, 0.f);
  for (int64_t p = a.start; p < a.end; ++p) {
    const T* v = v_base + a.slot(p);
    for (int64_t g = 0; g < a.G; ++g) {
      const float w = a.scores[g * L + (p - a.start)];
      for (int64_t i = 0; i < a.D; ++i) a.acc[g * a.D + i] += w * to_float(v[i]);
    }
  }
}

template <typename T>
FRUGAL_AVX512 void values_avx512(const GroupArgs& a, const T* v_base) {  // any D % 16 == 0
  const int64_t L = a.end - a.start;
  std::fill(a.acc, a.acc + a.G * a.D, 0.f);
  for (int64_t p = a.start; p < a.end; ++p) {
    const T* v = v_base + a.slot(p);
    for (int64_t g = 0; g < a.G; ++g) {
      const __m512 w = _mm512_set1_ps(a.scores[g * L + (p - a.start)]);
      float* acc = a.acc + g * a.D;
      for (int64_t i = 0; i < a.D; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(w, load16(v + i), _mm512_loadu_ps(acc + i)));
    }
  }
}

// D = 16 * ND: the accumulators of HG heads kept in registers.
template <typename T, int ND>
FRUGAL_AVX512 void values_blocked(const GroupArgs& a, const T* v_base) {
  constexpr int D = 16 * ND;
  constexpr int HG = ND <= 4 ? 4 : 2;  // heads per pass: HG * ND accumulators + ND values <= 24 registers
  const int64_t L = a.end - a.start;
  for (int64_t g0 = 0; g0 < a.G; g0 += HG) {
    const int hg = int(std::min<int64_t>(HG, a.G - g0));
    __m512 acc[HG][ND];
    for (int h = 0; h < HG; ++h)
      for (int i = 0; i < ND; ++i) acc[h][i] = _mm512_setzero_ps();
    for (int64_t p = a.start; p < a.end; ++p) {
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

// One KV head's group over one chunk: K phase, exponentials (m, l), V phase. `amx_token_stride` > 0: both
// products on AMX tiles (bf16 caches; the caller holds a frugal::amx::TileScope).
template <typename T>
void attend_chunk(const GroupArgs& a, const T* k_base, const T* v_base, float* m, float* l, int64_t amx_token_stride) {
  const bool vector = has_avx512() && a.D % 16 == 0;
  const int64_t L = a.end - a.start;
  if constexpr (std::is_same<T, at::BFloat16>::value) {
    if (amx_token_stride > 0) {
      const frugal::amx::Group group{a.q_bf16, a.G, a.D, a.slots, a.start, a.end, a.scale, k_base, v_base,
                                     amx_token_stride};
      frugal::amx::scores(group, a.scores);
      exp_rows(a.scores, a.G, L, m, l);
      frugal::amx::values(group, a.scores, a.acc);
      return;
    }
  }
  if constexpr (std::is_same<T, float>::value || std::is_same<T, at::BFloat16>::value) {
    if (vector) {
      bool dp = false;
      if constexpr (std::is_same<T, at::BFloat16>::value) {
        dp = a.q_bf16 != nullptr;
        if (dp && a.D == 32) scores_blocked_bf16dp<2>(a, k_base);
        else if (dp && a.D == 64) scores_blocked_bf16dp<4>(a, k_base);
        else if (dp && a.D == 128) scores_blocked_bf16dp<8>(a, k_base);
        else dp = false;
      }
      if (!dp) {
        if (a.D == 32) scores_blocked<T, 2>(a, k_base);
        else if (a.D == 64) scores_blocked<T, 4>(a, k_base);
        else if (a.D == 128) scores_blocked<T, 8>(a, k_base);
        else scores_avx512<T>(a, k_base);
      }
      exp_rows(a.scores, a.G, L, m, l);
      if (a.D == 32) values_blocked<T, 2>(a, v_base);
      else if (a.D == 64) values_blocked<T, 4>(a, v_base);
      else if (a.D == 128) values_blocked<T, 8>(a, v_base);
      else values_avx512<T>(a, v_base);
      return;
    }
  }
  scores_scalar<T>(a, k_base);
  exp_rows(a.scores, a.G, L, m, l);
  values_scalar<T>(a, v_base);
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
  const bool use_amx = std::is_same<T, at::BFloat16>::value && frugal::amx::enabled() && frugal::amx::supports(G, D);
  const bool use_dp = std::is_same<T, at::BFloat16>::value && (D == 32 || D == 64 || D == 128) &&
                      (use_amx || frugal::simd::has_avx512_bf16());
  // Work items: (request, chunk of kChunk positions from the request's first attended position).
  std::vector<int64_t> starts(B), item_request, item_chunk, first_item(B + 1, 0);
  int64_t total_positions = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t end = lens[b];
    TORCH_CHECK(end >= 0 && end <= block_tables.size(1) * block_size, "seq_lens[", b, "] = ", end,
                " does not fit the request's block table (", block_tables.size(1), " blocks of ", block_size, ")");
    starts[b] = sliding_window > 0 ? std::max<int64_t>(0, end - sliding_window) : 0;
    const int64_t chunks = (std::max<int64_t>(end - starts[b], 0) + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      item_request.push_back(b);
      item_chunk.push_back(c);
    }
    first_item[b + 1] = first_item[b] + chunks;
    total_positions += end - starts[b];
  }
  const int64_t num_items = first_item[B];
  // The queries, contiguous [B, H, D]: in fp32, and as they are for the bf16 dot products.
  std::vector<float> q(B * H * D);
  std::vector<at::BFloat16> q_bf16(use_dp ? B * H * D : 0);
  const T* q_src = query.data_ptr<T>();
  const int64_t q_batch_stride = query.stride(0), q_head_stride = query.stride(1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const T* row = q_src + b * q_batch_stride + h * q_head_stride;
      float* dst = q.data() + (b * H + h) * D;
      for (int64_t i = 0; i < D; ++i) dst[i] = to_float(row[i]);
      if (use_dp) std::memcpy(q_bf16.data() + (b * H + h) * D, row, D * sizeof(T));
    }
  }
  // Per item and head: m, l and the unnormalised accumulator [D] (every item writes all of its own: no zeroing).
  const std::unique_ptr<float[]> part_m(new float[num_items * H]), part_l(new float[num_items * H]),
      part_acc(new float[num_items * H * D]);
  auto run_item = [&](int64_t item) {
    const int64_t b = item_request[item];
    const int64_t start = starts[b] + item_chunk[item] * kChunk, end = std::min(lens[b], start + kChunk);
    std::vector<float> scores(G * (end - start));
    std::vector<int64_t> slots;
    position_offsets(tables + b * table_stride, block_size, block_stride, token_stride, start, end, slots);
    std::optional<frugal::amx::TileScope> tiles;
    if (use_amx) tiles.emplace();
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      const int64_t h0 = kvh * G;
      const int64_t q_offset = (b * H + h0) * D;
      const GroupArgs args{q.data() + q_offset, use_dp ? q_bf16.data() + q_offset : nullptr, G, D, slots.data(), start,
                           end, float(scale), scores.data(), part_acc.get() + (item * H + h0) * D};
      attend_chunk<T>(args, k_cache + kvh * head_stride, v_cache + kvh * head_stride, part_m.get() + item * H + h0,
                      part_l.get() + item * H + h0, use_amx ? token_stride : 0);
    }
  };
  // Threads only when there is enough to attend (the caller runs every item itself when helpers are busy).
  frugal::WorkSharing::instance().run_streams(total_positions * Hkv >= 1024 ? num_items : -num_items, run_item);
  // Merge each head's chunks in order: out = sum_c w_c acc_c, w_c = exp(m_c - M) / sum_c' exp(m_c' - M) l_c'.
  std::vector<float> weights, merged(D);
  for (int64_t b = 0; b < B; ++b) {
    weights.resize(first_item[b + 1] - first_item[b]);
    for (int64_t h = 0; h < H; ++h) {
      T* o = out.data_ptr<T>() + b * out.stride(0) + h * out.stride(1);
      const int64_t i0 = first_item[b], i1 = first_item[b + 1];
      if (i0 == i1) {  // nothing to attend to
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(0.f);
        continue;
      }
      float M = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t c = i0; c < i1; ++c) M = std::max(M, part_m[c * H + h]);
      for (int64_t c = i0; c < i1; ++c) {
        weights[c - i0] = std::exp(part_m[c * H + h] - M);
        total += part_l[c * H + h] * weights[c - i0];
      }
      for (int64_t c = i0; c < i1; ++c) weights[c - i0] /= total;
      // Per dim: v = sum over chunks in order of acc_c * w_c (chunk-outer so the dim loop vectorises).
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t c = i0; c < i1; ++c) {
        const float w = weights[c - i0];
        const float* src = part_acc.get() + (c * H + h) * D;
        for (int64_t i = 0; i < D; ++i) merged[i] += src[i] * w;
      }
      for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(merged[i]);
    }
  }
}

}  // namespace

namespace frugal::fused {

at::Tensor paged_attention_decode(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
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

}  // namespace frugal::fused
