// The tile grid over a tensor's 2-D view: the one definition of where tile t lies and how big a section's
// tile table is. Header-only and torch-free, so the format library, the ops (CPU and CUDA host code), the
// Python bindings (xorgemm._C.TileGrid) and the native tests all use these exact lines.
#pragma once

#include <stdint.h>

#include <stdexcept>
#include <string>

#include "codec/tile_codec.h"

namespace xorgemm {
namespace format {

// Raised for any malformed section or unusable grid; the Python layer adds the file and tensor name.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct TileGrid {
  uint64_t rows, cols;  // the tensor as 2-D: (shape[0], prod(shape[1:])); 1-D tensors are one row
  uint32_t tile_rows, tile_cols;
  uint32_t elem_bytes;  // 1, 2, 4 or 8

  // __host__ __device__: the GPU kernels take the grid by value and ask it the same questions.
  XG_HD uint64_t grid_rows() const { return (rows + tile_rows - 1) / tile_rows; }
  XG_HD uint64_t grid_cols() const { return (cols + tile_cols - 1) / tile_cols; }
  XG_HD uint64_t num_tiles() const { return grid_rows() * grid_cols(); }
  XG_HD uint64_t tensor_bytes() const { return rows * cols * elem_bytes; }
  // Bytes taken by the tile table and its padding: where the first payload starts.
  XG_HD uint64_t table_bytes() const {
    return codec::align_up(num_tiles() * sizeof(codec::TileEntry), codec::kTileAlign);
  }
  XG_HD uint64_t tile_row0(uint64_t t) const { return t / grid_cols() * tile_rows; }
  XG_HD uint64_t tile_col0(uint64_t t) const { return t % grid_cols() * tile_cols; }
  // Rows/cols of tile t, which are smaller than the tile shape on the ragged edge.
  XG_HD uint32_t tile_height(uint64_t t) const {
    return rows - tile_row0(t) < tile_rows ? (uint32_t)(rows - tile_row0(t)) : tile_rows;
  }
  XG_HD uint32_t tile_width(uint64_t t) const {
    return cols - tile_col0(t) < tile_cols ? (uint32_t)(cols - tile_col0(t)) : tile_cols;
  }

  // Throws FormatError if the shape, tile shape or element size is unusable.
  void check() const {
    if (!(elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8))
      throw FormatError("element size " + std::to_string(elem_bytes) + " is not 1, 2, 4 or 8 bytes");
    if (tile_rows == 0 || tile_cols == 0 || (uint64_t)tile_rows * tile_cols > codec::kMaxTileElems)
      throw FormatError("tile shape " + std::to_string(tile_rows) + "x" + std::to_string(tile_cols) +
                        " is empty or holds more than " + std::to_string(codec::kMaxTileElems) + " elements");
    // Keeps rows*cols*elem_bytes and every offset derived from it far from overflow.
    if (rows == 0 || cols == 0 || rows > (1ull << 40) || cols > (1ull << 40) || rows * cols > (1ull << 44))
      throw FormatError("tensor shape " + std::to_string(rows) + "x" + std::to_string(cols) + " is out of range");
  }

  // A checked grid from signed sizes (what Python and ATen hand over).
  static TileGrid make(int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols, int64_t elem_bytes) {
    if (rows <= 0 || cols <= 0 || tile_rows <= 0 || tile_cols <= 0 || elem_bytes <= 0 || tile_rows > UINT32_MAX ||
        tile_cols > UINT32_MAX || elem_bytes > 8)
      throw FormatError("shape " + std::to_string(rows) + "x" + std::to_string(cols) + ", tile shape " +
                        std::to_string(tile_rows) + "x" + std::to_string(tile_cols) + " and element size " +
                        std::to_string(elem_bytes) + " must be positive");
    TileGrid g{(uint64_t)rows, (uint64_t)cols, (uint32_t)tile_rows, (uint32_t)tile_cols, (uint32_t)elem_bytes};
    g.check();
    return g;
  }

  // The grid over a tensor's 2-D view: (shape[0], prod(shape[1:])); a 1-D tensor is one row, a 0-d one 1x1.
  static TileGrid of_shape(const int64_t* shape, int ndim, int64_t tile_rows, int64_t tile_cols,
                           int64_t elem_bytes) {
    int64_t rows = ndim == 0 ? 1 : (ndim == 1 ? 1 : shape[0]), cols = 1;
    for (int i = ndim <= 1 ? 0 : 1; i < ndim; ++i) {
      if (shape[i] < 0 || (shape[i] > 0 && cols > (int64_t(1) << 44) / shape[i]))
        throw FormatError("tensor shape is out of range");
      cols *= shape[i];
    }
    return make(rows, cols, tile_rows, tile_cols, elem_bytes);
  }
};

}  // namespace format
}  // namespace xorgemm
