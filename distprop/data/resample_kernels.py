"""Compiled (numba) kernels of `distprop.data.resample`: Pillow's bilinear resampling
of an HWC uint8 image region, written with the flip and the fused elementwise tail
straight into the sample's place in the batch.

The arithmetic is Pillow's own (``src/libImaging/Resample.c``, 8 bits per channel):
float32 box edges, filter weights computed in double precision and normalised per
output pixel, then rounded to 22-bit fixed point; one pass along each axis, each
rounded and clipped to uint8, in the order Pillow 13 chooses (older Pillows always
start with the horizontal one, so their bytes differ by a level here and there).
The integer sums do not depend on the order of their terms, so each pass may run in
whatever loop order vectorises best and still give Pillow's bytes exactly. The elementwise tail comes as a table of what each of the
256 values becomes in each channel (see `Tail.table`), so its arithmetic is numpy's.

Imported only where images are resampled (numba's import and the first compilation
take a moment; compiled code is cached on disk beside this file or in numba's
cache directory).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_PRECISION = 22  # Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2
_HALF = 1 << (_PRECISION - 1)


@njit(cache=True, nogil=True)
def coefficients(in_size, in0, in1, out_size):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for the bilinear filter:
    the first input pixel and count of each output pixel's taps (``bounds``), and the
    taps' fixed-point weights (``weights``, zero past the count)."""
    scale = np.float64(np.float32(in1 - in0)) / out_size
    filterscale = scale if scale > 1.0 else 1.0
    support = filterscale  # the bilinear filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.empty((out_size, 2), np.int32)
    weights = np.zeros((out_size, ksize), np.int32)
    taps = np.empty(ksize, np.float64)
    inverse = 1.0 / filterscale
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        first = int(center - support + 0.5)
        if first < 0:
            first = 0
        count = int(center + support + 0.5)
        if count > in_size:
            count = in_size
        count -= first
        total = 0.0
        for x in range(count):
            distance = (x + first - center + 0.5) * inverse
            if distance < 0.0:
                distance = -distance
            weight = 1.0 - distance if distance < 1.0 else 0.0
            taps[x] = weight
            total += weight
        for x in range(count):
            if total != 0.0:
                taps[x] /= total
            weights[xx, x] = int(0.5 + taps[x] * (1 << _PRECISION))
        bounds[xx, 0] = first
        bounds[xx, 1] = count
    return bounds, weights


@njit(cache=True, nogil=True, inline="always")
def _clip8(value):
    value >>= _PRECISION
    return 0 if value < 0 else (255 if value > 255 else value)


@njit(cache=True, nogil=True)
def _horizontal(image, first_row, rows, bounds, weights, column_offset):
    """Rows ``first_row ..`` (`rows` of them) of HWC uint8 `image` resampled along x
    (tap positions shifted left by `column_offset`), as uint8."""
    channels = image.shape[2]
    out_w = bounds.shape[0]
    out = np.empty((rows, out_w, channels), np.uint8)
    if channels == 3:  # the common case, its three sums kept apart for the compiler
        for r in range(rows):
            row = image[first_row + r]
            for xx in range(out_w):
                start, count = bounds[xx, 0] - column_offset, bounds[xx, 1]
                s0 = s1 = s2 = _HALF
                for x in range(count):
                    k = weights[xx, x]
                    s0 += np.int32(row[start + x, 0]) * k
                    s1 += np.int32(row[start + x, 1]) * k
                    s2 += np.int32(row[start + x, 2]) * k
                out[r, xx, 0] = _clip8(s0)
                out[r, xx, 1] = _clip8(s1)
                out[r, xx, 2] = _clip8(s2)
        return out
    for r in range(rows):
        row = image[first_row + r]
        for xx in range(out_w):
            start, count = bounds[xx, 0] - column_offset, bounds[xx, 1]
            for c in range(channels):
                s = _HALF
                for x in range(count):
                    s += np.int32(row[start + x, c]) * weights[xx, x]
                out[r, xx, c] = _clip8(s)
    return out


@njit(cache=True, nogil=True)
def _vertical(image, bounds, weights, row_offset, first_column, columns, sums, yy, out_row):
    """Output row `yy` of the vertical pass over columns ``first_column ..`` (`columns`
    of them) of HWC uint8 `image` (tap rows shifted up by `row_offset`), clipped into
    `out_row`, a flat uint8 array: whole rows at a time, which vectorises."""
    channels = image.shape[2]
    width = columns * channels
    start, count = bounds[yy, 0] - row_offset, bounds[yy, 1]
    sums[:width] = _HALF
    for y in range(count):
        k = weights[yy, y]
        line = image[start + y, first_column:first_column + columns].reshape(width)
        for i in range(width):
            sums[i] += np.int32(line[i]) * k
    for i in range(width):
        out_row[i] = _clip8(sums[i])


@njit(cache=True, nogil=True)
def _write(row, yy, flip, out, table):
    """Put resampled HWC row `row` (flat uint8) into row `yy` of `out` (channels first),
    through `table`, mirrored if `flip`."""
    channels, out_w = out.shape[0], out.shape[2]
    for c in range(channels):
        plane, values = out[c, yy], table[c]
        if flip:
            for xx in range(out_w):
                plane[out_w - 1 - xx] = values[row[xx * channels + c]]
        else:
            for xx in range(out_w):
                plane[xx] = values[row[xx * channels + c]]


@njit(cache=True, nogil=True)
def resample_into(image, x0, y0, x1, y1, flip, out, table):
    """Resample the region ``(x0, y0, x1, y1)`` (float32 edges, in `image`'s pixels) of
    HWC uint8 `image` to ``out.shape[1:]``, mirror it if `flip`, and write
    ``table[c, v]`` for each resampled value ``v`` into `out`, a ``(channels, height,
    width)`` array or view.

    The passes run in Pillow 13's order: vertical first where the image loses more
    than twice as many rows as columns (counted on the whole image, as Pillow does),
    else horizontal first over the rows the vertical filter reads."""
    height, width, channels = image.shape
    out_h, out_w = out.shape[1], out.shape[2]
    bounds_v, weights_v = coefficients(height, y0, y1, out_h)
    bounds_h, weights_h = coefficients(width, x0, x1, out_w)
    row = np.empty(max(out_w, width) * channels, np.uint8)
    sums = np.empty(max(out_w, width) * channels, np.int32)
    if height - out_h > 0 and height - out_h > 2 * (width - out_w):
        first = bounds_h[0, 0]  # the columns the horizontal taps read
        columns = bounds_h[out_w - 1, 0] + bounds_h[out_w - 1, 1] - first
        down = np.empty((out_h, columns, channels), np.uint8)
        for yy in range(out_h):
            _vertical(image, bounds_v, weights_v, 0, first, columns, sums, yy, down[yy].reshape(columns * channels))
        across = _horizontal(down, 0, out_h, bounds_h, weights_h, first)
        for yy in range(out_h):
            _write(across[yy].reshape(out_w * channels), yy, flip, out, table)
        return
    first = bounds_v[0, 0]  # the rows the vertical taps read
    rows = bounds_v[out_h - 1, 0] + bounds_v[out_h - 1, 1] - first
    across = _horizontal(image, first, rows, bounds_h, weights_h, 0)
    for yy in range(out_h):
        _vertical(across, bounds_v, weights_v, first, 0, out_w, sums, yy, row)
        _write(row, yy, flip, out, table)
