// The streaming linears and the paged KV write as dispatcher ops (torch.ops.frugal.*), so that
// torch.compile can call them from generated code (frugal/runner/compiled_decode.py). Eager Python
// calls the same functions through the pybind module (module.cpp), which is a little cheaper.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "kernel_ops.h"

#include <cstring>

namespace frugal {

// key/value [n, Hkv, D] -> kv_cache [2, num_blocks, block_size, Hkv, D] at flat slots slot_mapping [m]
// (m <= n: rows past m are padding), as frugal.layers.attention.write_kv_cache does: one row copy per
// slot (no index_copy_ temporaries; the native decode step calls this once per layer).
void write_kv_cache(const at::Tensor& kv_cache, const at::Tensor& key_in, const at::Tensor& value_in,
                    const at::Tensor& slot_mapping) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be contiguous [2, num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64");
  const int64_t n = slot_mapping.numel(), row = kv_cache.size(3) * kv_cache.size(4);
  TORCH_CHECK(key_in.size(0) >= n && value_in.size(0) >= n, "fewer key/value rows than slots");
  // Rows of [n, Hkv * D] in the cache dtype, each contiguous (views of a fused qkv output qualify).
  auto rows = [&](const at::Tensor& t) {
    at::Tensor r = t.narrow(0, 0, n).reshape({n, -1}).to(kv_cache.scalar_type());
    TORCH_CHECK(r.size(1) == row, "key/value rows hold ", r.size(1), " values, the cache ", row);
    return r.stride(1) == 1 ? r : r.contiguous();
  };
  const at::Tensor key = rows(key_in), value = rows(value_in), slots = slot_mapping.contiguous();
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2), bytes = row * kv_cache.element_size();
  char* k_cache = static_cast<char*>(kv_cache.data_ptr());
  char* v_cache = k_cache + kv_cache.stride(0) * kv_cache.element_size();
  const char* k = static_cast<const char*>(key.data_ptr());
  const char* v = static_cast<const char*>(value.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size(), v_stride = value.stride(0) * value.element_size();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " outside the KV cache");
    std::memcpy(k_cache + slot[t] * bytes, k + t * k_stride, bytes);
    std::memcpy(v_cache + slot[t] * bytes, v + t * v_stride, bytes);
  }
}

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
