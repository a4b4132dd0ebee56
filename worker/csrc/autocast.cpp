// Autocast with a chosen dtype for CPU and CUDA, as torch.autocast does it
// (torch/amp/autocast_mode.py, __enter__ and __exit__). tch 0.26 only exposes
// CUDA autocast with its default dtype, and skips it without CUDA.

#include <ATen/autocast_mode.h>

#include <cstdio>
#include <exception>

#include "shim.h"

// The numbering Rust relies on (worker/src/torch/shim.rs).
static_assert(static_cast<int>(c10::DeviceType::CPU) == 0, "c10::DeviceType::CPU");
static_assert(static_cast<int>(c10::DeviceType::CUDA) == 1, "c10::DeviceType::CUDA");
static_assert(static_cast<int>(c10::ScalarType::Half) == 5, "c10::ScalarType::Half");
static_assert(static_cast<int>(c10::ScalarType::Float) == 6, "c10::ScalarType::Float");
static_assert(static_cast<int>(c10::ScalarType::BFloat16) == 15, "c10::ScalarType::BFloat16");

namespace {

void write_err(char* err, size_t err_len, const char* what) {
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", what);
  }
}

// Only CPU and CUDA: other device types have no autocast dispatch key in
// every build, and libtorch throws for them.
bool known_device(int32_t device_type) {
  return device_type == static_cast<int32_t>(c10::DeviceType::CPU) ||
         device_type == static_cast<int32_t>(c10::DeviceType::CUDA);
}

bool known_dtype(int32_t dtype) {
  return dtype == static_cast<int32_t>(c10::ScalarType::Half) ||
         dtype == static_cast<int32_t>(c10::ScalarType::BFloat16) ||
         dtype == static_cast<int32_t>(c10::ScalarType::Float);
}

}  // namespace

extern "C" int32_t sb_autocast_enter(int32_t device_type, int32_t dtype,
                                     sb_autocast_state* prev, char* err,
                                     size_t err_len) {
  if (!known_device(device_type) || !known_dtype(dtype) || prev == nullptr) {
    write_err(err, err_len, "autocast: unsupported device type or dtype");
    return 1;
  }
  try {
    const auto dev = static_cast<c10::DeviceType>(device_type);
    prev->enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
    prev->dtype = static_cast<int32_t>(at::autocast::get_autocast_dtype(dev));
    prev->cache_enabled = at::autocast::is_autocast_cache_enabled() ? 1 : 0;
    at::autocast::set_autocast_enabled(dev, true);
    at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(dtype));
    at::autocast::increment_nesting();
    return 0;
  } catch (const std::exception& e) {
    write_err(err, err_len, e.what());
    return 1;
  }
}

extern "C" int32_t sb_autocast_exit(int32_t device_type,
                                    const sb_autocast_state* prev, char* err,
                                    size_t err_len) {
  if (!known_device(device_type) || prev == nullptr || !known_dtype(prev->dtype)) {
    write_err(err, err_len, "autocast: unsupported device type or saved state");
    return 1;
  }
  try {
    const auto dev = static_cast<c10::DeviceType>(device_type);
    // Casts of leaf tensors are cached inside the region; the cache must not
    // outlive the outermost one (it would hold stale weights).
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dev, prev->enabled != 0);
    at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(prev->dtype));
    at::autocast::set_autocast_cache_enabled(prev->cache_enabled != 0);
    return 0;
  } catch (const std::exception& e) {
    write_err(err, err_len, e.what());
    return 1;
  }
}

extern "C" int32_t sb_autocast_is_enabled(int32_t device_type) {
  if (!known_device(device_type)) {
    return 0;
  }
  return at::autocast::is_autocast_enabled(static_cast<c10::DeviceType>(device_type)) ? 1 : 0;
}

extern "C" int32_t sb_autocast_dtype(int32_t device_type) {
  if (!known_device(device_type)) {
    return -1;
  }
  return static_cast<int32_t>(
      at::autocast::get_autocast_dtype(static_cast<c10::DeviceType>(device_type)));
}
