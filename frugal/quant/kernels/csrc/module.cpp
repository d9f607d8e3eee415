// The Python module of frugal's CPU kernels (torch.ops.frugal.* are registered in fused_cpu.cpp).
#include <torch/extension.h>

#include "common.h"
#include "decode_attention_amx.h"
#include "kernel_ops.h"
#include "work_sharing.h"


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "frugal CPU kernels: INT4/INT8 weight-only and BF16 streaming GEMV";
  m.def("int4_linear", &frugal::int4_linear, "INT4 group-wise weight-only linear");
  m.def("int4_dequantize", &frugal::int4_dequantize, "INT4 kernel-layout weights -> dense");
  m.def("int8_linear", &frugal::int8_linear, "INT8 per-channel weight-only linear");
  m.def("bf16_linear", &frugal::bf16_linear, "BF16 streaming linear");
  m.def("int4_x16_linear", &frugal::int4_x16_linear, "INT4 (x16 layout) x INT8-rounded activations, AVX512-VNNI");
  m.def("int4_x16_dequantize", &frugal::int4_x16_dequantize, "INT4 x16-layout weights -> dense");
  m.def("int8_x16_linear", &frugal::int8_x16_linear, "INT8 (x16 layout) x INT8-rounded activations, AVX512-VNNI");
  m.def("has_vnni_path", &frugal::has_vnni_path, "whether this CPU has AVX512-VNNI (the x16 kernel)");
  m.def("read_probe", &frugal::read_probe, "read a uint8 buffer once (memory bandwidth probe)");
  m.def("argmax_rows", &frugal::argmax_rows, "argmax over each row of float32 logits, one thread",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("amx_attention_available", &frugal::amx::available,
        "whether decode attention can use AMX-BF16 tiles here (CPU support and the kernel's permission)");
  m.def("amx_attention_enabled", &frugal::amx::enabled, "whether bf16 decode attention uses AMX tiles now");
  m.def("set_amx_attention", &frugal::amx::set_enabled, pybind11::arg("enabled"),
        "switch AMX decode attention on or off for this process (FRUGAL_NO_AMX=1 starts it off)");
  m.def("contiguous_chunk",
        [](int64_t claim, int64_t num_chunks, int64_t parts) {
          // The kernels call it unchecked; from Python a bad argument is an error, not a division by zero.
          TORCH_CHECK(parts >= 1, "parts must be >= 1, got ", parts);
          TORCH_CHECK(claim >= 0 && claim < num_chunks, "claim ", claim, " outside [0, ", num_chunks, ")");
          return frugal::contiguous_chunk(claim, num_chunks, parts);
        },
        pybind11::arg("claim"), pybind11::arg("num_chunks"), pybind11::arg("parts"),
        "the chunk that claim k of a stream-ordered job runs (WorkSharing::run_streams)");
  m.def("set_stream_order", [](bool on) { frugal::WorkSharing::instance().set_stream_order(on); },
        pybind11::arg("enabled"), "streaming kernels: each thread one contiguous range of rows (default) or not");
  m.def("stream_order_enabled", [] { return frugal::WorkSharing::instance().stream_order(); },
        "whether the streaming kernels claim in stream order now");
  frugal::register_decode_stack(m);
  m.def("has_fast_path", &frugal::cpu_has_avx512_bf16, "whether this CPU has AVX512-BF16 (else every call dequantises)");
}

