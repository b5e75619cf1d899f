// The device error word: what a kernel reports instead of faulting. A fault (an illegal address, a device
// assert) is sticky: it kills the process's CUDA context and every tenant's work with it. So the kernels
// skip what they cannot read safely (kErrorTile) or serve (kErrorRowId, error_bits.h), OR a bit into this
// per-device word and go on; the host copies the word back asynchronously after each launch and raises the
// error, clearly, at the next call on that device. No call waits for the GPU to learn it.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace xorgemm {
namespace cuda {

// The error word of `device` (an int32 tensor of one element there, made on first use).
at::Tensor device_error_word(const at::Device& device);

// After the launches of a call on `stream`: the word's copy to the host, queued behind them.
void publish_device_errors(const at::Device& device, cudaStream_t stream);

// Before a call: raises what an earlier call's kernels reported on `device` (once; the word is cleared).
void raise_device_errors(const at::Device& device);

}  // namespace cuda
}  // namespace xorgemm
