// The streaming linears and the paged KV write as dispatcher ops (torch.ops.frugal.*), so that
// torch.compile can call them from generated code (frugal/runner/compiled_decode.py). Eager Python
// calls the same functions through the pybind module (module.cpp), which is a little cheaper.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "kernel_ops.h"

namespace frugal {
namespace {

// key/value [n, Hkv, D] -> kv_cache [2, num_blocks, block_size, Hkv, D] at flat slots slot_mapping [m]
// (m <= n: rows past m are padding), as frugal.layers.attention.write_kv_cache does.
void write_kv_cache(const at::Tensor& kv_cache, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& slot_mapping) {
  const int64_t num_kv_heads = kv_cache.size(3), head_dim = kv_cache.size(4), n = slot_mapping.size(0);
  kv_cache[0].view({-1, num_kv_heads, head_dim})
      .index_copy_(0, slot_mapping, key.narrow(0, 0, n).to(kv_cache.scalar_type()));
  kv_cache[1].view({-1, num_kv_heads, head_dim})
      .index_copy_(0, slot_mapping, value.narrow(0, 0, n).to(kv_cache.scalar_type()));
}

}  // namespace
}  // namespace frugal

TORCH_LIBRARY_FRAGMENT(frugal, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size, Tensor? bias, "
        "int max_gemv_rows) -> Tensor");
  m.def("int4_x16_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size, Tensor? bias, "
        "int max_gemv_rows) -> Tensor");
  m.def("int8_x16_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int max_gemv_rows) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int max_gemv_rows) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias, int max_gemv_rows) -> Tensor");
  m.def("write_kv_cache(Tensor(a!) kv_cache, Tensor key, Tensor value, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(frugal, CPU, m) {
  m.impl("int4_linear", &frugal::int4_linear);
  m.impl("int4_x16_linear", &frugal::int4_x16_linear);
  m.impl("int8_x16_linear", &frugal::int8_x16_linear);
  m.impl("int8_linear", &frugal::int8_linear);
  m.impl("bf16_linear", &frugal::bf16_linear);
  m.impl("write_kv_cache", &frugal::write_kv_cache);
}
