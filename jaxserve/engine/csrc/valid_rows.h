// The rows of a matmul's x that hold real inputs: an engine step pads its tokens (and its
// sequences' logits rows) up to the size of a compiled program, and passes the real count as a
// scalar operand, so that the padding costs no multiply. Rows past it are written as zeros
// (deterministic, and no NaN from stale memory can reach a later reduction).

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// min(rows[0], m_dim), at least 0; a rows buffer without exactly one element is an error (-1).
inline int64_t ValidRows(xla::ffi::Buffer<xla::ffi::S32> rows, int64_t m_dim) {
  if (rows.element_count() != 1) return -1;
  return std::clamp<int64_t>(rows.typed_data()[0], 0, m_dim);
}

// out[valid : m_dim, :] = 0 for an [m_dim, n_dim] float32 output.
inline void ZeroPaddingRows(float* out, int64_t valid, int64_t m_dim, int64_t n_dim) {
  if (valid < m_dim) std::memset(out + valid * n_dim, 0, sizeof(float) * (m_dim - valid) * n_dim);
}

}  // namespace jaxserve
