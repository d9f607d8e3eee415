// A whole decode step of a Llama-family decoder in one C++ call (frugal/runner/native_decode.py).
//
// A batch-1 decode step of a small model spends as long in Python as in its kernels: per layer ~12
// module calls, views, splits and ~11 kernel calls through pybind or the dispatcher (SmolLM2-135M
// shape, INT4: ~5 ms of a ~14 ms step). `DecodeStack` holds every layer's weights (the same tensors the
// eager modules hold, no copies) and runs all layers for decode-only rows — one query token per request —
// calling the very kernels the eager path calls, in the same order, on the same values:
//
//   h, residual = rms_norm(x) | fused_add_rms_norm(x, residual)          (input_layernorm)
//   qkv = qkv_proj(h); rotate q and k in place (the eager op rotates a copy: same arithmetic)
//   kv_cache[slot] = k, v; attn = paged_attention_decode(q, ...)
//   h, residual = fused_add_rms_norm(o_proj(attn), residual)              (post_attention_layernorm)
//   x = down_proj(silu_and_mul(gate_up_proj(h)))
//   ... and after the last layer: norm(x + residual).
//
// So its output equals the eager model's bit for bit (tests/runner/test_native_decode.py). The Python
// side decides which models qualify and builds the stack once; everything else runs eagerly.
#include <torch/extension.h>

#include "kernel_ops.h"

#include <array>
#include <chrono>
#include <string>
#include <vector>

namespace frugal {
namespace {

enum class LinearKind { kInt4X16, kInt4, kInt8X16, kInt8, kBf16, kDense };

LinearKind parse_kind(const std::string& kind) {
  if (kind == "int4_x16") return LinearKind::kInt4X16;
  if (kind == "int4") return LinearKind::kInt4;
  if (kind == "int8_x16") return LinearKind::kInt8X16;
  if (kind == "int8") return LinearKind::kInt8;
  if (kind == "bf16") return LinearKind::kBf16;
  if (kind == "dense") return LinearKind::kDense;
  TORCH_CHECK(false, "unknown linear kind '", kind, "' (int4_x16, int4, int8_x16, int8, bf16, dense)");
}

// One projection: which kernel, its weight tensors and settings, exactly as the layer's LinearMethod
// calls it (frugal/quant/int4.py, int8.py, dense.py; `dense` is F.linear).
struct NativeLinear {
  LinearKind kind;
  at::Tensor weight, scales;
  c10::optional<at::Tensor> zeros, bias;
  int64_t group_size, max_rows;

  NativeLinear(const std::string& kind_name, at::Tensor weight_, c10::optional<at::Tensor> scales_,
               c10::optional<at::Tensor> zeros_, c10::optional<at::Tensor> bias_, int64_t group_size_,
               int64_t max_rows_)
      : kind(parse_kind(kind_name)), weight(std::move(weight_)), zeros(std::move(zeros_)), bias(std::move(bias_)),
        group_size(group_size_), max_rows(max_rows_) {
    const bool quantized = kind != LinearKind::kBf16 && kind != LinearKind::kDense;
    TORCH_CHECK(quantized == scales_.has_value(), "'", kind_name, "' ", quantized ? "needs" : "takes no", " scales");
    if (scales_.has_value()) scales = *scales_;
  }

  at::Tensor operator()(const at::Tensor& x) const {
    switch (kind) {
      case LinearKind::kInt4X16: return int4_x16_linear(x, weight, scales, zeros, group_size, bias, max_rows);
      case LinearKind::kInt4: return int4_linear(x, weight, scales, zeros, group_size, bias, max_rows);
      case LinearKind::kInt8X16: return int8_x16_linear(x, weight, scales, bias, max_rows);
      case LinearKind::kInt8: return int8_linear(x, weight, scales, bias, max_rows);
      case LinearKind::kBf16: return bf16_linear(x, weight, bias, max_rows);
      case LinearKind::kDense: return at::linear(x, weight, bias);
    }
    TORCH_CHECK(false, "unreachable");
  }
};

// What `DecodeStack::profile` splits a step's time into (frugal/bench/profile_decode.py).
enum Part : int { kNorms, kQkv, kRotaryKvWrite, kAttention, kO, kGateUp, kSiluAndMul, kDown, kLmHead, kNumParts };
constexpr std::array<const char*, kNumParts> kPartNames = {
    "norms", "qkv_proj", "rotary + kv write", "attention", "o_proj", "gate_up_proj", "silu_and_mul", "down_proj",
    "lm_head"};

// Per-part wall time and call counts while profiling is on; off, `run` is a plain call.
class PartClock {
 public:
  bool enabled = false;

  template <class F>
  auto run(Part part, F&& fn) -> decltype(fn()) {
    if (!enabled) return fn();
    const auto start = std::chrono::steady_clock::now();
    auto result = fn();
    const auto elapsed = std::chrono::steady_clock::now() - start;
    ns_[part] += std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count();
    calls_[part] += 1;
    return result;
  }

  void reset() { ns_.fill(0); calls_.fill(0); }

  // {part name: (calls, seconds)} for the parts that ran.
  pybind11::dict as_dict() const {
    pybind11::dict out;
    for (int part = 0; part < kNumParts; ++part) {
      if (calls_[part] > 0) out[kPartNames[part]] = pybind11::make_tuple(calls_[part], ns_[part] * 1e-9);
    }
    return out;
  }

 private:
  std::array<int64_t, kNumParts> ns_{}, calls_{};
};

struct NativeLayer {
  NativeLinear qkv, o, gate_up, down;
  at::Tensor input_norm, post_norm;
  double input_eps, post_eps;
  int64_t sliding_window;  // 0: none
};

class DecodeStack {
 public:
  DecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale, at::Tensor cos_cache,
              at::Tensor sin_cache, at::Tensor final_norm, double final_eps)
      : H_(num_heads), Hkv_(num_kv_heads), D_(head_dim), scale_(scale), cos_(std::move(cos_cache)),
        sin_(std::move(sin_cache)), final_norm_(std::move(final_norm)), final_eps_(final_eps) {
    TORCH_CHECK(H_ > 0 && Hkv_ > 0 && H_ % Hkv_ == 0 && D_ > 0, "bad head counts");
  }

  void add_layer(NativeLinear qkv, NativeLinear o, NativeLinear gate_up, NativeLinear down, at::Tensor input_norm,
                 double input_eps, at::Tensor post_norm, double post_eps, int64_t sliding_window) {
    layers_.push_back(NativeLayer{std::move(qkv), std::move(o), std::move(gate_up), std::move(down),
                                  std::move(input_norm), std::move(post_norm), input_eps, post_eps, sliding_window});
  }

  int64_t num_layers() const { return int64_t(layers_.size()); }

  void set_lm_head(NativeLinear head) { head_.emplace(std::move(head)); }
  bool has_lm_head() const { return head_.has_value(); }

  // hidden rows [m, hidden] -> logits [m, vocab] float32: the LM head's kernel, then its output widened
  // to float32 in a plain loop. (`.float()` is an OpenMP-parallel copy at this size: on 2 cores its
  // spinning workers then take the core the next step's kernel helpers need.)
  at::Tensor logits(const at::Tensor& hidden_rows) const {
    TORCH_CHECK(head_.has_value(), "no LM head set");
    const at::Tensor y = clock_.run(kLmHead, [&] { return (*head_)(hidden_rows.contiguous()); });
    if (y.scalar_type() == at::kFloat) return y;
    if (y.scalar_type() != at::kBFloat16) return y.to(at::kFloat);
    at::Tensor out = at::empty(y.sizes(), y.options().dtype(at::kFloat));
    const at::BFloat16* src = y.data_ptr<at::BFloat16>();
    float* dst = out.data_ptr<float>();
    for (int64_t i = 0, total = y.numel(); i < total; ++i) dst[i] = static_cast<float>(src[i]);
    return out;
  }

  // hidden [n, hidden] (the embedded tokens), positions / slot_mapping / seq_lens [n] int64, block_tables
  // [n, max_blocks] int64 -> the final norm's output [n, hidden].
  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& positions, const std::vector<at::Tensor>& kv_caches,
                     const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens) const {
    TORCH_CHECK(int64_t(kv_caches.size()) == num_layers(), "one KV cache per layer expected");
    TORCH_CHECK(hidden.dim() == 2, "hidden must be [n, hidden]");
    const int64_t n = hidden.size(0);
    TORCH_CHECK(positions.numel() == n && slot_mapping.numel() == n && seq_lens.numel() == n &&
                    block_tables.size(0) == n,
                "decode rows only: one position, slot, sequence length and block table per token");
    const int64_t q_size = H_ * D_, kv_size = Hkv_ * D_;
    at::Tensor x = hidden.contiguous(), residual, h;
    for (int64_t i = 0; i < num_layers(); ++i) {
      const NativeLayer& layer = layers_[i];
      const at::Tensor& kv_cache = kv_caches[i];
      TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 5 && kv_cache.size(3) == Hkv_ &&
                      kv_cache.size(4) == D_ && kv_cache.scalar_type() == x.scalar_type(),
                  "KV cache of layer ", i, " must be contiguous [2, blocks, block_size, Hkv, D] in the model dtype");
      if (i == 0) {
        residual = x;
        h = clock_.run(kNorms, [&] { return fused::rms_norm(x, layer.input_norm, layer.input_eps); });
      } else {
        std::tie(h, residual) = clock_.run(
            kNorms, [&] { return fused::fused_add_rms_norm(x, residual, layer.input_norm, layer.input_eps); });
      }
      const at::Tensor qkv = clock_.run(kQkv, [&] { return layer.qkv(h); });  // [n, (H + 2 Hkv) D]
      TORCH_CHECK(qkv.size(1) == q_size + 2 * kv_size && qkv.stride(1) == 1,
                  "qkv_proj output must be contiguous rows of (H + 2 Hkv) * head_dim");
      // Views of qkv's rows made directly (narrow + view are ~7 dispatcher calls a layer; the views must not
      // outlive qkv, which stays alive to the end of the layer).
      const int64_t row = qkv.stride(0);
      char* base = static_cast<char*>(qkv.data_ptr());
      const int64_t elem = qkv.element_size();
      at::Tensor q = at::from_blob(base, {n, H_, D_}, {row, D_, 1}, qkv.options());
      at::Tensor k = at::from_blob(base + q_size * elem, {n, Hkv_, D_}, {row, D_, 1}, qkv.options());
      const at::Tensor v =
          at::from_blob(base + (q_size + kv_size) * elem, {n, Hkv_, D_}, {row, D_, 1}, qkv.options());
      clock_.run(kRotaryKvWrite, [&] {
        fused::rotary_inplace(positions, q, k, cos_, sin_);
        write_kv_cache(kv_cache, k, v, slot_mapping);
        return 0;
      });
      const at::Tensor attn = clock_.run(kAttention, [&] {
        return fused::paged_attention_decode(q, kv_cache, block_tables, seq_lens, scale_, layer.sliding_window);
      });  // [n, H, D] contiguous
      const at::Tensor o =
          clock_.run(kO, [&] { return layer.o(at::from_blob(attn.data_ptr(), {n, q_size}, attn.options())); });
      std::tie(h, residual) =
          clock_.run(kNorms, [&] { return fused::fused_add_rms_norm(o, residual, layer.post_norm, layer.post_eps); });
      const at::Tensor gate_up = clock_.run(kGateUp, [&] { return layer.gate_up(h); });
      const at::Tensor act = clock_.run(kSiluAndMul, [&] { return fused::silu_and_mul(gate_up); });
      x = clock_.run(kDown, [&] { return layer.down(act); });
    }
    return std::get<0>(
        clock_.run(kNorms, [&] { return fused::fused_add_rms_norm(x, residual, final_norm_, final_eps_); }));
  }

  // Profiling: per-part wall time of `forward` and `logits` (a steady_clock read around each kernel call,
  // ~50 ns; off by default). Not thread-safe: one step at a time, as the engine runs them.
  void set_profiling(bool enabled) { clock_.enabled = enabled; }
  bool profiling() const { return clock_.enabled; }
  void reset_profile() { clock_.reset(); }
  pybind11::dict profile() const { return clock_.as_dict(); }

 private:
  int64_t H_, Hkv_, D_;
  double scale_;
  at::Tensor cos_, sin_, final_norm_;
  double final_eps_;
  std::vector<NativeLayer> layers_;
  c10::optional<NativeLinear> head_;
  mutable PartClock clock_;
};

}  // namespace

void register_decode_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<NativeLinear>(m, "NativeLinear")
      .def(py::init<const std::string&, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                    c10::optional<at::Tensor>, int64_t, int64_t>(),
           py::arg("kind"), py::arg("weight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
           py::arg("group_size"), py::arg("max_rows"));
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, at::Tensor, double>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"),
           py::arg("cos_cache"), py::arg("sin_cache"), py::arg("final_norm"), py::arg("final_eps"))
      .def("add_layer", &DecodeStack::add_layer, py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("input_norm"), py::arg("input_eps"), py::arg("post_norm"), py::arg("post_eps"),
           py::arg("sliding_window"))
      .def_property_readonly("num_layers", &DecodeStack::num_layers)
      .def("set_lm_head", &DecodeStack::set_lm_head, py::arg("head"))
      .def_property_readonly("has_lm_head", &DecodeStack::has_lm_head)
      .def_property("profiling", &DecodeStack::profiling, &DecodeStack::set_profiling)
      .def("reset_profile", &DecodeStack::reset_profile)
      .def("profile", &DecodeStack::profile,
           "{part: (calls, seconds)} accumulated while `profiling` is on, since the last reset_profile()")
      .def("logits", &DecodeStack::logits, py::call_guard<py::gil_scoped_release>(), py::arg("hidden_rows"))
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>(), py::arg("hidden"),
           py::arg("positions"), py::arg("kv_caches"), py::arg("slot_mapping"), py::arg("block_tables"),
           py::arg("seq_lens"));
}

}  // namespace frugal
