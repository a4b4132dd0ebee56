// libtorch's current CUDA stream and device, for NCCL (collective/nccl.rs):
// collectives are queued on the very stream libtorch queues its kernels on,
// so they are ordered after the backward pass and before the optimizer with
// no device-wide synchronisation.
//
// Built with SWIFTBRUSH_WITH_CUDA when libc10_cuda.so sits next to libtorch
// (worker/build.rs); otherwise every function reports that CUDA is missing.

#include <cstdio>
#include <exception>

#include "shim.h"

namespace {
void write_err(char* err, size_t err_len, const char* what) {
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", what);
  }
}
}  // namespace

#ifdef SWIFTBRUSH_WITH_CUDA

#include <c10/core/Stream.h>

// The pip wheel ships the CUDA runtime library but not all of its headers:
// torch 2.11.0+cu130's nvidia/cu13/include has cuda_runtime_api.h but not
// the crt/host_defines.h it includes, so c10/cuda/CUDAStream.h cannot be
// included. These declarations mirror that header as torch 2.11 ships it
// (checked against the pinned wheel's include/c10/cuda/CUDAStream.h and
// CUDAFunctions.h): the class layout (one c10::Stream) and
// the out-of-line functions called below, which libc10_cuda.so exports. A
// mismatch in a name or signature fails at link time; the layout is what
// c10::Stream is, trivially copyable, returned in registers in both.
namespace c10::cuda {
class CUDAStream {
 public:
  // cudaStream_t; a return type is not part of the mangled name.
  void* stream() const;
  bool query() const;

 private:
  c10::Stream stream_;
};
CUDAStream getCurrentCUDAStream(DeviceIndex device_index);
void set_device(DeviceIndex device, bool force);
DeviceIndex device_count() noexcept;
}  // namespace c10::cuda

static_assert(sizeof(c10::cuda::CUDAStream) == sizeof(c10::Stream),
              "CUDAStream wraps exactly one c10::Stream");

namespace {
// Checked here: c10 asserts (and aborts in some builds) on an index it does
// not know.
bool valid_device(int32_t device, char* err, size_t err_len) {
  const int32_t count = c10::cuda::device_count();
  if (device < 0 || device >= count) {
    char buf[160];
    std::snprintf(buf, sizeof(buf),
                  "CUDA device %d requested but libtorch sees %d CUDA device(s)",
                  device, count);
    write_err(err, err_len, buf);
    return false;
  }
  return true;
}
}  // namespace

extern "C" int32_t sb_cuda_set_device(int32_t device, char* err, size_t err_len) {
  try {
    if (!valid_device(device, err, err_len)) {
      return 1;
    }
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device), false);
    return 0;
  } catch (const std::exception& e) {
    write_err(err, err_len, e.what());
    return 1;
  }
}

extern "C" int32_t sb_cuda_current_stream(int32_t device, void** stream,
                                          char* err, size_t err_len) {
  try {
    if (stream == nullptr || !valid_device(device, err, err_len)) {
      return 1;
    }
    *stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
    return 0;
  } catch (const std::exception& e) {
    write_err(err, err_len, e.what());
    return 1;
  }
}

extern "C" int32_t sb_cuda_current_stream_query(int32_t device, int32_t* done,
                                                char* err, size_t err_len) {
  try {
    if (done == nullptr || !valid_device(device, err, err_len)) {
      return 1;
    }
    *done = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).query() ? 1 : 0;
    return 0;
  } catch (const std::exception& e) {
    write_err(err, err_len, e.what());
    return 1;
  }
}

#else

static const char* const kNoCuda =
    "this swiftbrush build has no CUDA support: libc10_cuda.so was not next to "
    "libtorch when it was compiled (a CPU-only torch wheel); install the CUDA "
    "wheel of torch and rebuild";

extern "C" int32_t sb_cuda_set_device(int32_t, char* err, size_t err_len) {
  write_err(err, err_len, kNoCuda);
  return 1;
}

extern "C" int32_t sb_cuda_current_stream(int32_t, void**, char* err, size_t err_len) {
  write_err(err, err_len, kNoCuda);
  return 1;
}

extern "C" int32_t sb_cuda_current_stream_query(int32_t, int32_t*, char* err,
                                                size_t err_len) {
  write_err(err, err_len, kNoCuda);
  return 1;
}

#endif
