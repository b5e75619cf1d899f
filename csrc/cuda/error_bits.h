// Bits of the device error word (device_errors.h): what a kernel reports instead of faulting.
#pragma once

#include <stdint.h>

namespace xorgemm {
namespace cuda {

constexpr uint32_t kErrorTile = 1;   // a tile entry malformed or its payload outside its section: skipped
constexpr uint32_t kErrorRowId = 2;  // a row's fine-tune id out of range: the row served the base

}  // namespace cuda
}  // namespace xorgemm
