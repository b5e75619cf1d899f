#include "cuda/device_errors.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <mutex>
#include <string>
#include <vector>

#include "cuda/error_bits.h"

namespace xorgemm {
namespace cuda {
namespace {

struct ErrorWord {
  at::Tensor word;                   // on the device: kernels OR bits into it
  volatile uint32_t* seen = nullptr;  // pinned host memory: its last copy
};

std::mutex mutex;
std::vector<ErrorWord> words;  // by device index

ErrorWord& word_of(const at::Device& device) {
  std::lock_guard<std::mutex> lock(mutex);
  const size_t i = (size_t)device.index();
  if (words.size() <= i) words.resize(i + 1);
  ErrorWord& w = words[i];
  if (!w.word.defined()) {
    w.word = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
    void* host = nullptr;
    C10_CUDA_CHECK(cudaMallocHost(&host, sizeof(uint32_t)));  // kept for the process's life
    w.seen = static_cast<volatile uint32_t*>(host);
    *w.seen = 0;
  }
  return w;
}

}  // namespace

at::Tensor device_error_word(const at::Device& device) { return word_of(device).word; }

void publish_device_errors(const at::Device& device, cudaStream_t stream) {
  ErrorWord& w = word_of(device);
  C10_CUDA_CHECK(cudaMemcpyAsync(const_cast<uint32_t*>(w.seen), w.word.data_ptr(), sizeof(uint32_t),
                                 cudaMemcpyDeviceToHost, stream));
}

void raise_device_errors(const at::Device& device) {
  ErrorWord& w = word_of(device);
  const uint32_t bits = *w.seen;
  if (bits == 0) return;
  *w.seen = 0;
  w.word.zero_();
  std::string what;
  if (bits & kErrorTile)
    what += " a delta section with a tile outside it (malformed, truncated or with wrong offsets): that tile was "
            "skipped, so that call's output was wrong. XorLinear and the loaders validate the sections they make "
            "resident; validate sections given to torch.ops.xorgemm directly (xorgemm.resident.section_offsets).";
  if (bits & kErrorRowId)
    what += std::string(what.empty() ? "" : " And") +
            " row fine-tune ids outside -1..n-1 (-1 is the base): those rows were served the base.";
  TORCH_CHECK(false, "xorgemm: an earlier call on ", device, " was given", what);
}

}  // namespace cuda
}  // namespace xorgemm
