// Multi-tensor (`_foreach_*`) forms of the per-parameter loops of a step:
// Adam, the gradient clip's norm and scale, the EMA update. tch 0.24 does
// not expose them. Each function runs exactly the op sequence the Rust
// per-tensor loop ran (same ops, same scalars, same order), so on the CPU,
// where libtorch runs a foreach op tensor by tensor, the results are the
// same bit for bit; on CUDA they become a few multi-tensor kernels instead
// of one launch per parameter and op. The callers pass the parameter list
// in chunks (foreach.rs, `chunks`), so the temporaries below are bounded by
// a chunk, not the model.
//
// Tensors cross as tch's handles: an `at::Tensor*` each (torch-sys's
// `tensor` type); copies of an at::Tensor share its storage, so in-place
// ops act on the caller's tensors.

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstdio>
#include <exception>
#include <vector>

#include "shim.h"

namespace {

std::vector<at::Tensor> list(void* const* handles, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*static_cast<at::Tensor*>(handles[i]));
  }
  return out;
}

int32_t fail(char* err, size_t err_len, const char* what) {
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", what);
  }
  return 1;
}

}  // namespace

extern "C" int32_t sb_foreach_adam_step(void* const* params, void* const* grads,
                                        void* const* exp_avg, void* const* exp_avg_sq,
                                        size_t n, double one_minus_beta1, double beta2,
                                        double one_minus_beta2, double bias2_sqrt,
                                        double eps, double step_size, char* err,
                                        size_t err_len) {
  try {
    c10::AutoGradMode no_grad(false);
    auto p = list(params, n);
    auto g = list(grads, n);
    auto m = list(exp_avg, n);
    auto v = list(exp_avg_sq, n);
    at::_foreach_lerp_(m, g, one_minus_beta1);       // m.lerp_(g, 1 - b1)
    at::_foreach_mul_(v, beta2);                      // v *= b2
    {
      // Freed before `denom`: at most two temporary lists are alive at once
      // (the caller bounds each by its chunk, foreach.rs).
      auto scaled = at::_foreach_mul(g, one_minus_beta2);  // g * (1 - b2)
      at::_foreach_addcmul_(v, scaled, g);                 // v += g (1 - b2) * g
    }
    auto denom = at::_foreach_sqrt(v);                // sqrt(v) / sqrt(bias2) + eps
    at::_foreach_div_(denom, bias2_sqrt);
    at::_foreach_add_(denom, eps);
    auto update = at::_foreach_div(m, denom);         // m / denom * step_size
    at::_foreach_mul_(update, step_size);
    at::_foreach_sub_(p, update);                     // p -= update
    return 0;
  } catch (const std::exception& e) {
    return fail(err, err_len, e.what());
  }
}

extern "C" int32_t sb_foreach_norm(void* const* tensors, size_t n, void** norms, char* err,
                                   size_t err_len) {
  try {
    c10::AutoGradMode no_grad(false);
    auto out = at::_foreach_norm(list(tensors, n));
    for (size_t i = 0; i < n; ++i) {
      norms[i] = new at::Tensor(std::move(out[i]));
    }
    return 0;
  } catch (const std::exception& e) {
    return fail(err, err_len, e.what());
  }
}

extern "C" int32_t sb_foreach_mul_scalar_(void* const* tensors, size_t n, double scalar,
                                          char* err, size_t err_len) {
  try {
    c10::AutoGradMode no_grad(false);
    auto t = list(tensors, n);
    at::_foreach_mul_(t, scalar);
    return 0;
  } catch (const std::exception& e) {
    return fail(err, err_len, e.what());
  }
}

extern "C" int32_t sb_foreach_ema_update(void* const* shadow, void* const* params, size_t n,
                                         double one_minus_decay, char* err, size_t err_len) {
  try {
    c10::AutoGradMode no_grad(false);
    auto s = list(shadow, n);
    auto delta = at::_foreach_sub(s, list(params, n));  // (s - p) * (1 - decay)
    at::_foreach_mul_(delta, one_minus_decay);
    at::_foreach_sub_(s, delta);                         // s -= delta
    return 0;
  } catch (const std::exception& e) {
    return fail(err, err_len, e.what());
  }
}
