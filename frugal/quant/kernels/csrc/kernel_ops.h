// Declarations of frugal's CPU kernels, for the files that call them from C++: module.cpp (the pybind
// module), dispatcher_ops.cpp (torch.ops.frugal.*) and decode_stack.cpp (the whole decode step).
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace frugal {

// Streaming linears (int4_cpu.cpp, vnni_cpu.cpp, dense_cpu.cpp): x [M, K] -> [M, N] in x's dtype.
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& zeros, int64_t group_size,
                       const c10::optional<at::Tensor>& bias, int64_t max_gemv_rows);
at::Tensor int4_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zeros, int64_t group_size, at::ScalarType dtype);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias, int64_t max_gemv_rows);
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t max_gemv_rows);
int64_t read_probe(const at::Tensor& buffer);
at::Tensor int4_x16_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zeros, int64_t group_size,
                           const c10::optional<at::Tensor>& bias, int64_t max_gemv_rows);
at::Tensor int4_x16_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                               const c10::optional<at::Tensor>& zeros, int64_t group_size, at::ScalarType dtype);
bool has_vnni_path();
at::Tensor int8_x16_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& bias, int64_t max_gemv_rows);

// key/value [n, Hkv, D] -> kv_cache [2, num_blocks, block_size, Hkv, D] at flat slots slot_mapping [m <= n]
// (dispatcher_ops.cpp; also torch.ops.frugal.write_kv_cache).
void write_kv_cache(const at::Tensor& kv_cache, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& slot_mapping);

// Fused per-token ops (fused_cpu.cpp; decode attention: decode_attention_cpu.cpp), the CPU implementations
// behind torch.ops.frugal.*.
namespace fused {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps);
// Rotates query [n, H, D] and key [n, Hkv, D] in place (any token/head strides, contiguous D).
void rotary_inplace(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos_cache,
                    const at::Tensor& sin_cache);
at::Tensor silu_and_mul(const at::Tensor& x);
at::Tensor paged_attention_decode(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t sliding_window);
}  // namespace fused

// logits [rows, vocab] float32 -> [rows] int64, torch.argmax(dim=-1)'s answer on one thread (fused_cpu.cpp).
at::Tensor argmax_rows(const at::Tensor& logits);

// Adds NativeLinear and DecodeStack (decode_stack.cpp) to the pybind module.
void register_decode_stack(pybind11::module& m);

}  // namespace frugal
