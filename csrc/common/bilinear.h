// Bilinear sampling convention shared by every op that samples a plane at normalized locations.
//
// Torch-free: plain arithmetic on the accumulation type (float or double), usable on host and
// device. A normalized location (loc_x, loc_y) in [0, 1] maps to the pixel coordinate
// x = loc_x * W - 0.5, y = loc_y * H - 0.5 (align_corners=False). The sample contributes (value and
// gradient) only if -1 < x < W and -1 < y < H, so NaN contributes nothing. Interpolation uses the
// floor cell x0 = floor(x), y0 = floor(y) with fractions lx = x - x0, ly = y - y0 in [0, 1]; its
// corners (x0 or x0 + 1, y0 or y0 + 1) that fall outside the image read zero.
#pragma once

#include <cstdint>

#include "common/math.h"

namespace m2f {

// The floor cell of one sample. x0, y0, lx and ly are 0 when the sample does not contribute.
template <typename acc_t>
struct BilinearCell {
  bool valid;  // the sample contributes (value and gradient)
  int64_t x0;  // floor(x), in [-1, W - 1]
  int64_t y0;  // floor(y), in [-1, H - 1]
  acc_t lx;    // x - x0, in [0, 1]
  acc_t ly;    // y - y0, in [0, 1]
};

template <typename acc_t>
M2F_HOST_DEVICE BilinearCell<acc_t> bilinear_cell(acc_t loc_x, acc_t loc_y, int64_t height,
                                                  int64_t width) {
  const acc_t x = unfused_product(loc_x, static_cast<acc_t>(width)) - acc_t(0.5);
  const acc_t y = unfused_product(loc_y, static_cast<acc_t>(height)) - acc_t(0.5);
  BilinearCell<acc_t> cell{false, 0, 0, acc_t(0), acc_t(0)};
  // Written so that NaN fails the test.
  if (!(x > acc_t(-1) && x < static_cast<acc_t>(width) && y > acc_t(-1) &&
        y < static_cast<acc_t>(height))) {
    return cell;
  }
  // floor for x > -1: truncate, then step down for negative fractions (cheaper than a floor call).
  cell.x0 = static_cast<int64_t>(x);
  cell.y0 = static_cast<int64_t>(y);
  if (static_cast<acc_t>(cell.x0) > x) --cell.x0;
  if (static_cast<acc_t>(cell.y0) > y) --cell.y0;
  cell.lx = x - static_cast<acc_t>(cell.x0);
  cell.ly = y - static_cast<acc_t>(cell.y0);
  cell.valid = true;
  return cell;
}

}  // namespace m2f
