// The C ABI between the worker's Rust code and the libtorch features tch
// 0.24 does not expose: autocast with a chosen dtype (autocast.cpp), the
// current CUDA stream (cuda_stream.cpp), the TF32 and cuDNN benchmark
// switches (math_mode.cpp) and multi-tensor ops (foreach.cpp). Rust declares
// the same functions in worker/src/torch/shim.rs; keep the two in step. No
// C++ exception crosses this boundary: every function that can fail returns
// 0 on success and writes a message into err.
#ifndef SWIFTBRUSH_SHIM_H
#define SWIFTBRUSH_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Device types and dtypes use libtorch's own numbering (c10::DeviceType,
// c10::ScalarType); autocast.cpp asserts the values it relies on.
typedef struct {
  int32_t enabled;
  int32_t dtype;
  int32_t cache_enabled;
} sb_autocast_state;

// Enables autocast for device_type with dtype on this thread, saving the
// previous state into *prev (what torch.autocast.__enter__ does).
int32_t sb_autocast_enter(int32_t device_type, int32_t dtype,
                          sb_autocast_state* prev, char* err, size_t err_len);
// Restores *prev; clears the cast cache when leaving the outermost region
// (torch.autocast.__exit__).
int32_t sb_autocast_exit(int32_t device_type, const sb_autocast_state* prev,
                         char* err, size_t err_len);
int32_t sb_autocast_is_enabled(int32_t device_type);
int32_t sb_autocast_dtype(int32_t device_type);

// Makes device the calling thread's current CUDA device (NCCL binds a
// communicator to the current device).
int32_t sb_cuda_set_device(int32_t device, char* err, size_t err_len);
// libtorch's current CUDA stream on device for the calling thread, as a
// cudaStream_t.
int32_t sb_cuda_current_stream(int32_t device, void** stream, char* err,
                               size_t err_len);
// Whether all work queued so far on libtorch's current stream of device has
// finished: *done = 1 when it has, 0 when it is still running.
int32_t sb_cuda_current_stream_query(int32_t device, int32_t* done, char* err,
                                     size_t err_len);

// Allows (1) or forbids (0) TF32 for float32 cuBLAS products and cuDNN
// convolutions.
int32_t sb_set_allow_tf32(int32_t allow, char* err, size_t err_len);
// Bit 0: cuBLAS may use TF32; bit 1: cuDNN may.
int32_t sb_allow_tf32(void);
// Turns cuDNN's benchmark mode on (1) or off (0).
int32_t sb_set_benchmark_cudnn(int32_t enabled, char* err, size_t err_len);
// 1 when cuDNN's benchmark mode is on.
int32_t sb_benchmark_cudnn(void);

// Multi-tensor forms of the per-parameter loops (foreach.cpp). Tensors are
// tch handles (at::Tensor*), n of each list.
int32_t sb_foreach_adam_step(void* const* params, void* const* grads, void* const* exp_avg,
                             void* const* exp_avg_sq, size_t n, double one_minus_beta1,
                             double beta2, double one_minus_beta2, double bias2_sqrt,
                             double eps, double step_size, char* err, size_t err_len);
// Writes n new handles (owned by the caller) of the tensors' 2-norms.
int32_t sb_foreach_norm(void* const* tensors, size_t n, void** norms, char* err,
                        size_t err_len);
int32_t sb_foreach_mul_scalar_(void* const* tensors, size_t n, double scalar, char* err,
                               size_t err_len);
int32_t sb_foreach_ema_update(void* const* shadow, void* const* params, size_t n,
                              double one_minus_decay, char* err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
