// How libtorch computes on CUDA, process-wide (worker/src/torch/math_mode.rs):
// - whether float32 matrix products and convolutions may run in TF32
//   (10-bit mantissa). libtorch's defaults differ by op (cuDNN convolutions
//   TF32, cuBLAS products IEEE), so an fp32 run on a GPU would silently be
//   part TF32; math_mode.rs sets both one way (precision.tf32);
// - cuDNN's benchmark mode (precision.cudnn_benchmark): time the
//   convolution algorithms for each new shape and keep the fastest.
// Both are flags in at::globalContext(): setting them needs no GPU, and on
// the CPU they change nothing.

#include <ATen/Context.h>

#include <cstdio>
#include <exception>

#include "shim.h"

extern "C" int32_t sb_set_allow_tf32(int32_t allow, char* err, size_t err_len) {
  try {
    at::globalContext().setAllowTF32CuBLAS(allow != 0);
    at::globalContext().setAllowTF32CuDNN(allow != 0);
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr && err_len > 0) {
      std::snprintf(err, err_len, "%s", e.what());
    }
    return 1;
  }
}

extern "C" int32_t sb_allow_tf32(void) {
  return (at::globalContext().allowTF32CuBLAS() ? 1 : 0) |
         (at::globalContext().allowTF32CuDNN() ? 2 : 0);
}

extern "C" int32_t sb_set_benchmark_cudnn(int32_t enabled, char* err, size_t err_len) {
  try {
    at::globalContext().setBenchmarkCuDNN(enabled != 0);
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr && err_len > 0) {
      std::snprintf(err, err_len, "%s", e.what());
    }
    return 1;
  }
}

extern "C" int32_t sb_benchmark_cudnn(void) {
  return at::globalContext().benchmarkCuDNN() ? 1 : 0;
}
