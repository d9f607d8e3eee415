// AMX-BF16 tile products for decode attention on bf16 KV caches (decode_attention_amx.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace frugal::amx {

// Whether this CPU has AMX-BF16 and Linux granted this process the tile state (asked once).
bool available();
// available() and not switched off (FRUGAL_NO_AMX=1 in the environment, or set_enabled(false)).
bool enabled();
void set_enabled(bool on);
// Shapes that take the tiles: 4 to 16 query heads per KV head (16 tile columns; below 4 the tiles' fixed
// costs outweigh the dot products saved: `frugal bench attention`, SmolLM2's 3 heads per KV head at 576
// positions 27 us on AVX-512 vs 31 on AMX), head_dim 32, 64 or 128.
bool supports(int64_t G, int64_t D);

// The tile configuration, held on this thread for the object's lifetime (released after).
class TileScope {
 public:
  TileScope();
  ~TileScope();
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// One KV head's query group over one request's positions [start, end).
struct Group {
  const c10::BFloat16* q_bf16;  // [G, D]
  int64_t G, D;
  const int64_t* slots;  // [end - start]: element offset of each position's row from k_base / v_base
  int64_t start, end;
  float scale;
  const c10::BFloat16* k_base;  // this KV head's K (position rows token_stride elements apart in a block)
  const c10::BFloat16* v_base;
  int64_t token_stride;
};

// scores [G, end - start] = scale * q . k per head and position.
void scores(const Group& group, float* scores);
// acc [G, D] = sum over positions of bf16(weights[g][p]) * v_p (weights [G, end - start], fp32).
void values(const Group& group, const float* weights, float* acc);

}  // namespace frugal::amx
