"""2-d pooling on NCHW images: max, average, adaptive average and global average.

Max and average pooling loop over the kh*kw offsets inside the window, each step one
vectorised operation over a strided view holding that offset's element of every
window; overlapping windows (stride < kernel) and padding need nothing special. The
arrays they allocate keep the input's memory layout, so channels-last activations
from conv2d stay channels-last.
"""

from __future__ import annotations

import numpy as np

from distprop import cpu_threads
from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module
from distprop.functional.conv import as_pair

# Below this many input elements per thread, handing work to a thread costs more than
# it saves (see distprop.cpu_threads).
_MIN_THREAD_ELEMENTS = 256 << 10


def _channels_last(x) -> bool:
    return x.strides[1] < x.strides[3]


def _in_layout(xp, a, channels_last):
    """a itself if stored in the layout asked for, else a copy that is."""
    if a.ndim != 4 or _channels_last(a) == channels_last:
        return a
    if channels_last:
        return xp.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return xp.ascontiguousarray(a)


def _empty(xp, shape, dtype, channels_last):
    """An uninitialised (N, C, H, W) array, channels-last in memory if asked."""
    if channels_last:
        n, c, h, w = shape
        return xp.empty((n, h, w, c), dtype).transpose(0, 3, 1, 2)
    return xp.empty(shape, dtype)


class PoolGeometry:
    """Kernel, stride and padding of a pooling call, the views they define, and the
    input's memory layout, which every array made here keeps."""

    def __init__(self, name, x, kernel_size, stride, padding):
        if x.ndim != 4:
            raise ValueError(f"{name} expects input of shape (N, C, H, W), got {tuple(x.shape)}")
        self.kh, self.kw = as_pair(kernel_size, f"{name}: kernel_size")
        self.sh, self.sw = as_pair(kernel_size if stride is None else stride, f"{name}: stride")
        self.ph, self.pw = as_pair(padding, f"{name}: padding")
        if min(self.kh, self.kw, self.sh, self.sw) < 1:
            raise ValueError(f"{name}: kernel_size and stride must be positive")
        if not (0 <= self.ph <= self.kh // 2 and 0 <= self.pw <= self.kw // 2):
            raise ValueError(f"{name}: padding must be between 0 and half the kernel size, got {padding!r}")
        self.n, self.c, self.h, self.w = x.shape
        self.channels_last = _channels_last(x)
        self.out_h = (self.h + 2 * self.ph - self.kh) // self.sh + 1
        self.out_w = (self.w + 2 * self.pw - self.kw) // self.sw + 1
        if self.out_h < 1 or self.out_w < 1:
            raise ValueError(f"{name}: kernel {self.kh}x{self.kw} is larger than the padded input")
        self.out_shape = (self.n, self.c, self.out_h, self.out_w)
        self.overlapping = self.sh < self.kh or self.sw < self.kw
        # Disjoint windows that cover the padded input exactly (no remainder rows or columns).
        self.tiles_input = (not self.overlapping and self.out_h * self.kh == self.h + 2 * self.ph
                            and self.out_w * self.kw == self.w + 2 * self.pw)

    def offsets(self):
        return [(i, j) for i in range(self.kh) for j in range(self.kw)]

    def padded(self, xp, x, fill):
        """x with `fill` around it (x itself without padding)."""
        if not (self.ph or self.pw):
            return x
        shape = (self.n, self.c, self.h + 2 * self.ph, self.w + 2 * self.pw)
        out = _empty(xp, shape, x.dtype, self.channels_last)
        out.fill(fill)
        self.interior(out)[...] = x
        return out

    def interior(self, padded):
        return padded[:, :, self.ph:self.ph + self.h, self.pw:self.pw + self.w]

    def view(self, padded, i, j):
        """Element (i, j) of every window: an (N, C, Ho, Wo) strided view."""
        return padded[:, :, i:i + self.sh * (self.out_h - 1) + 1:self.sh,
                      j:j + self.sw * (self.out_w - 1) + 1:self.sw]

    def empty_output(self, xp, dtype):
        return _empty(xp, self.out_shape, dtype, self.channels_last)

    def empty_padded(self, xp, dtype):
        """An uninitialised gradient of the padded input, in x's layout."""
        shape = (self.n, self.c, self.h + 2 * self.ph, self.w + 2 * self.pw)
        return _empty(xp, shape, dtype, self.channels_last)

    def scatter(self, g, contributions):
        """Fill g (a padded input's gradient, or a batch slice of one) from each
        offset's (n, C, Ho, Wo) share."""
        g.fill(0)
        for (i, j), part in zip(self.offsets(), contributions):
            if self.overlapping:
                self.view(g, i, j)[...] += part
            else:  # the views are disjoint
                self.view(g, i, j)[...] = part


def _batch_parts(xp, geo, work):
    """work(start, stop) over parts of the batch, on the CPU's threads (see
    distprop.cpu_threads; pooling's short strided runs gain from them), or as one call."""
    if xp is not np:
        work(0, geo.n)
    else:
        per_image = max(1, geo.c * geo.h * geo.w)  # (0 for empty maps)
        cpu_threads.map_parts(work, geo.n, min_per_part=max(1, _MIN_THREAD_ELEMENTS // per_image))


class MaxPool2d(Function):
    """Max over each window; the gradient goes to the window's first maximal element
    (row-major order), as in PyTorch, remembered as a small per-window offset index."""

    def __init__(self, kernel_size, stride, padding):
        self.args = kernel_size, stride, padding

    def forward(self, x):
        xp = get_array_module(x)
        geo = PoolGeometry("max_pool2d", x, *self.args)
        source = geo.padded(xp, x, -xp.inf)
        offsets = geo.offsets()
        best = geo.empty_output(xp, x.dtype)
        need_grad = self.needs_input_grad[0]
        argmax = improved = None
        if need_grad:
            argmax = geo.empty_output(xp, np.uint8 if len(offsets) <= 256 else np.int32)
            improved = geo.empty_output(xp, np.bool_)

        def work(start, stop):
            images = slice(start, stop)
            part_best, part_source = best[images], source[images]
            part_best[...] = geo.view(part_source, *offsets[0])
            if need_grad:
                part_argmax, part_improved = argmax[images], improved[images]
                part_argmax.fill(0)
            for k, (i, j) in enumerate(offsets[1:], start=1):
                candidate = geo.view(part_source, i, j)
                if need_grad:
                    # argmax = k where the candidate is strictly larger: k grows with the
                    # offset, so that is max(argmax, k * improved). (copyto with where=
                    # ran 70x slower than these two passes.)
                    xp.greater(candidate, part_best, out=part_improved)
                    if part_argmax.dtype == np.uint8:
                        k_where_improved = part_improved.view(np.uint8)
                        xp.multiply(k_where_improved, k, out=k_where_improved)
                    else:
                        k_where_improved = part_improved * np.int32(k)
                    xp.maximum(part_argmax, k_where_improved, out=part_argmax)
                xp.maximum(part_best, candidate, out=part_best)

        _batch_parts(xp, geo, work)
        if need_grad:
            self.geo, self.argmax = geo, argmax
        return best

    def backward(self, gy):
        xp = get_array_module(gy)
        geo, argmax = self.geo, self.argmax
        g = geo.empty_padded(xp, gy.dtype)
        gy = _in_layout(xp, gy, geo.channels_last)  # e.g. NCHW from a Flatten: match argmax's

        def work(start, stop):
            images = slice(start, stop)
            part_gy, part_argmax, part_g = gy[images], argmax[images], g[images]
            if geo.overlapping:
                geo.scatter(part_g, (part_gy * (part_argmax == k) for k in range(len(geo.offsets()))))
                return
            # Disjoint windows: each offset's share goes straight into its view.
            if not geo.tiles_input:
                part_g.fill(0)
            hit = xp.empty_like(part_argmax, dtype=np.bool_)  # in the same memory layout
            for k, (i, j) in enumerate(geo.offsets()):
                xp.equal(part_argmax, k, out=hit)
                xp.multiply(part_gy, hit, out=geo.view(part_g, i, j))

        _batch_parts(xp, geo, work)
        return (geo.interior(g),)


class AvgPool2d(Function):
    """Mean over each window; padding counts as zeros in the divisor unless
    count_include_pad is False (then each window divides by its real elements)."""

    def __init__(self, kernel_size, stride, padding, count_include_pad, divisor_override):
        self.args = kernel_size, stride, padding
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, x):
        xp = get_array_module(x)
        geo = PoolGeometry("avg_pool2d", x, *self.args)
        source = geo.padded(xp, x, 0)
        total = geo.empty_output(xp, x.dtype)
        total[...] = geo.view(source, 0, 0)
        for i, j in geo.offsets()[1:]:
            total += geo.view(source, i, j)
        self.divisor = self._divisor(xp, geo, x.dtype)
        total /= self.divisor
        self.geo = geo
        return total

    def _divisor(self, xp, geo, dtype):
        if self.divisor_override:
            return dtype.type(self.divisor_override)
        if self.count_include_pad or not (geo.ph or geo.pw):
            return dtype.type(geo.kh * geo.kw)
        # Count the real elements of each window by pooling a mask of ones.
        ones = xp.zeros((1, 1, geo.h + 2 * geo.ph, geo.w + 2 * geo.pw), dtype)
        geo.interior(ones)[...] = 1
        return sum(geo.view(ones, i, j) for i, j in geo.offsets())

    def backward(self, gy):
        xp = get_array_module(gy)
        share = gy / self.divisor
        g = self.geo.empty_padded(xp, gy.dtype)
        self.geo.scatter(g, (share for _ in self.geo.offsets()))
        return (self.geo.interior(g),)


class GlobalAvgPool2d(Function):
    """(N, C, H, W) -> (N, C): the mean of each channel's feature map."""

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"global_avg_pool2d expects input of shape (N, C, H, W), got {x.shape}")
        self.shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, gy):
        xp = get_array_module(gy)
        h, w = self.shape[2:]
        return (xp.broadcast_to((gy / (h * w))[:, :, None, None], self.shape),)


def _adaptive_bins(xp, size, out, dtype):
    """(out, size) averaging matrix of adaptive pooling: bin i covers
    [floor(i*size/out), ceil((i+1)*size/out)), as in PyTorch."""
    matrix = np.zeros((out, size))
    for i in range(out):
        start, stop = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:stop] = 1 / (stop - start)
    return xp.asarray(matrix.astype(dtype))


class AdaptiveAvgPool2d(Function):
    """Adaptive average pooling is separable and linear: y = A_h x A_w^T per feature
    map, with fixed averaging matrices, so both passes are two small batched GEMMs."""

    def __init__(self, output_size):
        self.output_size = output_size

    def forward(self, x):
        xp = get_array_module(x)
        out_h, out_w = self.output_size
        self.rows = _adaptive_bins(xp, x.shape[2], out_h, x.dtype)
        self.cols = _adaptive_bins(xp, x.shape[3], out_w, x.dtype)
        return cpu_threads.matmul(cpu_threads.matmul(self.rows, x), self.cols.T)

    def backward(self, gy):
        xp = get_array_module(gy)
        return (cpu_threads.matmul(cpu_threads.matmul(self.rows.T, gy), self.cols),)


def max_pool2d(x, kernel_size, stride=None, padding=0) -> Tensor:
    """Max pooling of x (N, C, H, W); stride defaults to kernel_size."""
    return MaxPool2d(kernel_size, stride, padding)(x)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad: bool = True,
               divisor_override=None) -> Tensor:
    """Average pooling of x (N, C, H, W); stride defaults to kernel_size."""
    return AvgPool2d(kernel_size, stride, padding, count_include_pad, divisor_override)(x)


def global_avg_pool2d(x) -> Tensor:
    """(N, C, H, W) -> (N, C), the mean over each feature map."""
    return GlobalAvgPool2d()(x)


def adaptive_avg_pool2d(x, output_size) -> Tensor:
    """Average pooling to a fixed (out_h, out_w) output (an int means a square; None
    keeps that input size), as in PyTorch."""
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool2d expects input of shape (N, C, H, W), got {x.shape}")
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    out_h, out_w = (x.shape[2 + i] if s is None else int(s) for i, s in enumerate(sizes))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"adaptive_avg_pool2d: output_size must be positive, got {output_size!r}")
    if (out_h, out_w) == (1, 1):
        return global_avg_pool2d(x).reshape(x.shape[:2] + (1, 1))
    return AdaptiveAvgPool2d((out_h, out_w))(x)
