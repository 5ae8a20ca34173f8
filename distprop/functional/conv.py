"""2-d convolution (cross-correlation, as in PyTorch) on NCHW images.

The scheme is im2col + GEMM, arranged for the CPU's caches:

* Activations are kept channels-last in memory. `conv2d` returns a logically NCHW
  array that is a transposed view of a contiguous (N, H, W, C) buffer; numpy's
  elementwise ops preserve that layout, so the next convolution reads its input as
  a contiguous NHWC block, every im2col row is a run of whole channel vectors, and
  the GEMM writes the output in place with no transpose afterwards. Channels-first
  input (images from the data loader) is read along image rows instead, into a
  K-major column matrix that the GEMM takes transposed.
* The batch is processed a few images at a time, so that the column matrix of a
  chunk (and its padded input) stays in cache between being written by the im2col
  copy and being read by the GEMM. Backward recomputes the columns per chunk
  instead of keeping a (N*Ho*Wo, kh*kw*C) matrix alive between the passes.
* With stride 1 the input gradient is itself a convolution (of the output gradient
  with the kernel flipped and its channel axes swapped), so it can run through the
  same im2col + GEMM path, the GEMM doing the summing over kernel offsets; that is
  used where its column matrix is no larger than col2im's (output channels not
  more than input channels). Otherwise the input gradient is col2im: per chunk, one
  GEMM per kernel offset and one strided add per offset (each over a whole chunk),
  never a loop over pixels.

On the GPU the whole batch is one chunk: there, fewer and larger kernels win.
"""

from __future__ import annotations

import numpy as np

from distprop import cpu_threads
from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module
from distprop.functional.channels import channel_op, channel_sum

# Bytes of column matrix per chunk on the CPU: a few MiB stays in L2/L3 between
# the im2col copy and the GEMM (measured best between 2 and 8 MiB here).
_CPU_CHUNK_BYTES = 4 << 20
# Below this much column matrix per thread, handing work to a thread costs more than
# it saves (see distprop.cpu_threads).
_MIN_THREAD_BYTES = 2 << 20


def as_pair(value, name):
    """(height, width) from an int or a pair (conv and pooling arguments)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _padding_per_side(padding, kernel, dilation, stride):
    """((top, bottom), (left, right)) for padding given as an int, a pair, 'valid' or
    'same' ('same' with an even kernel puts the extra row/column at the end, like PyTorch)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"conv2d: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        if stride != (1, 1):
            raise ValueError("conv2d: padding='same' needs stride 1")
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple((t // 2, t - t // 2) for t in totals)
    ph, pw = as_pair(padding, "conv2d: padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"conv2d: padding must be non-negative, got {padding!r}")
    return (ph, ph), (pw, pw)


class ConvGeometry:
    """The sizes of one convolution: input, kernel, per-side padding and output."""

    def __init__(self, x_shape, w_shape, stride, dilation, pad_h, pad_w, groups):
        if len(x_shape) != 4:
            raise ValueError(f"conv2d expects input of shape (N, C, H, W), got {tuple(x_shape)}")
        if len(w_shape) != 4:
            raise ValueError(f"conv2d expects weight of shape (out, in/groups, kh, kw), got {tuple(w_shape)}")
        self.n, self.c, self.h, self.w = x_shape
        self.o, self.cg, self.kh, self.kw = w_shape
        if groups < 1 or self.c % groups or self.o % groups:
            raise ValueError(f"conv2d: groups={groups} must divide both input channels ({self.c}) "
                             f"and output channels ({self.o})")
        if self.cg * groups != self.c:
            raise ValueError(f"conv2d: input has {self.c} channels but weight {tuple(w_shape)} "
                             f"expects {self.cg * groups} (in/groups={self.cg}, groups={groups})")
        self.groups, self.og = groups, self.o // groups
        (self.sh, self.sw), (self.dh, self.dw) = stride, dilation
        self.pad_h, self.pad_w = pad_h, pad_w
        self.hp, self.wp = self.h + sum(pad_h), self.w + sum(pad_w)
        self.out_h = (self.hp - self.dh * (self.kh - 1) - 1) // self.sh + 1
        self.out_w = (self.wp - self.dw * (self.kw - 1) - 1) // self.sw + 1
        if self.out_h < 1 or self.out_w < 1:
            raise ValueError(f"conv2d: kernel {self.kh}x{self.kw} (dilation {self.dh},{self.dw}) is larger "
                             f"than the padded input {self.hp}x{self.wp}")
        self.k = self.kh * self.kw * self.cg  # columns of one group's im2col matrix
        self.padded = self.hp != self.h or self.wp != self.w

    def images_per_chunk(self, xp, itemsize) -> int:
        """Images per im2col chunk: the whole batch on the GPU, a few MiB of columns on the CPU."""
        if xp is not np:
            return self.n
        return max(1, min(self.n, _CPU_CHUNK_BYTES // self.column_bytes_per_image(itemsize)))

    def column_bytes_per_image(self, itemsize) -> int:
        return max(1, self.out_h * self.out_w * self.groups * self.k * itemsize)  # (0 for no channels)

    def weight_matrix(self, weight):
        """weight (O, Cg, kh, kw) as (groups, kh*kw*Cg, O/groups): the GEMM's right side,
        rows ordered like the columns of the im2col matrix (kernel row, kernel column, channel)."""
        w = weight.reshape(self.groups, self.og, self.cg, self.kh, self.kw).transpose(0, 3, 4, 2, 1)
        return w.reshape(self.groups, self.k, self.og)

    def weight_from_matrix(self, xp, matrix):
        """The inverse of `weight_matrix`: (groups, kh*kw*Cg, O/groups) -> (O, Cg, kh, kw)."""
        w = matrix.reshape(self.groups, self.kh, self.kw, self.cg, self.og).transpose(0, 4, 3, 1, 2)
        return xp.ascontiguousarray(w).reshape(self.o, self.cg, self.kh, self.kw)

    def windows(self, xp, source):
        """A strided view (groups, n, Ho, Wo, kh, kw, Cg) of a padded NHWC `source`:
        row-major im2col order."""
        s_n, s_h, s_w, s_c = source.strides
        shape = (self.groups, source.shape[0], self.out_h, self.out_w, self.kh, self.kw, self.cg)
        strides = (self.cg * s_c, s_n, s_h * self.sh, s_w * self.sw, s_h * self.dh, s_w * self.dw, s_c)
        return xp.lib.stride_tricks.as_strided(source, shape, strides)

    def windows_channels_first(self, xp, source):
        """A strided view (groups, kh, kw, Cg, n, Ho, Wo) of a padded NCHW `source`:
        K-major im2col order, each (tap, channel) row a run along image rows."""
        s_n, s_c, s_h, s_w = source.strides
        shape = (self.groups, self.kh, self.kw, self.cg, source.shape[0], self.out_h, self.out_w)
        strides = (self.cg * s_c, s_h * self.dh, s_w * self.dw, s_c, s_n, s_h * self.sh, s_w * self.sw)
        return xp.lib.stride_tricks.as_strided(source, shape, strides)

    def interior(self, padded, channels_last=True):
        """The unpadded part of a padded (n, H, W, C) array, or (n, C, H, W) one."""
        top, left = self.pad_h[0], self.pad_w[0]
        if channels_last:
            return padded[:, top:top + self.h, left:left + self.w]
        return padded[:, :, top:top + self.h, left:left + self.w]

    def offset_view(self, padded, i, j):
        """The (n, Ho, Wo, ...) positions of a padded NHWC array that kernel offset (i, j)
        meets, one per output pixel."""
        top, left = i * self.dh, j * self.dw
        return padded[:, top:top + self.sh * (self.out_h - 1) + 1:self.sh,
                      left:left + self.sw * (self.out_w - 1) + 1:self.sw]

    def input_gradient_geometry(self):
        """For stride 1, the input gradient is itself a convolution: of the output
        gradient (N, O, Ho, Wo) with the kernel flipped in space and its channel axes
        swapped, padded by the kernel's extent minus the forward padding. None where
        that does not hold (strides, padding beyond the kernel's extent) or where its
        column matrix, (H*W, kh*kw*O) per image, would be larger than col2im's
        (Ho*Wo, kh*kw*C): col2im is then the cheaper of the two."""
        extent_h, extent_w = self.dh * (self.kh - 1), self.dw * (self.kw - 1)
        pad_h = tuple(extent_h - p for p in self.pad_h)
        pad_w = tuple(extent_w - p for p in self.pad_w)
        if (self.sh, self.sw) != (1, 1) or min(pad_h + pad_w) < 0:
            return None
        if self.h * self.w * self.o > self.out_h * self.out_w * self.c:
            return None
        return ConvGeometry((self.n, self.o, self.out_h, self.out_w), (self.c, self.og, self.kh, self.kw),
                            (1, 1), (self.dh, self.dw), pad_h, pad_w, self.groups)

    def flipped_kernel(self, weight):
        """weight (O, Cg, kh, kw) -> (C, O/groups, kh, kw), flipped in space: the kernel
        of `input_gradient_geometry`."""
        w = weight.reshape(self.groups, self.og, self.cg, self.kh, self.kw)[:, :, :, ::-1, ::-1]
        return w.transpose(0, 2, 1, 3, 4).reshape(self.c, self.og, self.kh, self.kw)


class _ColumnBuilder:
    """im2col for one chunk of images at a time, reusing its buffers across chunks.

    The copy runs along whichever axis is contiguous in x (logically NCHW):
    channels-last input (activations from conv2d) gives row-major columns, each row
    whole channel vectors; channels-first input (images from the data loader, with
    few channels) gives K-major columns, each row a run along image rows, handed out
    as a transposed view. The GEMMs take either layout as it is.
    """

    def __init__(self, xp, geometry, x, chunk, dtype):
        self.xp, self.geo, self.x = xp, geometry, x
        g = geometry
        self.channels_last = x.strides[1] <= x.strides[3]
        # A 1x1 kernel with stride 1 and no padding reads channels-last input as it is.
        self.direct = self.channels_last and (g.kh, g.kw, g.sh, g.sw) == (1, 1, 1, 1) and not g.padded
        if self.direct:
            return
        rows = chunk * g.out_h * g.out_w
        if self.channels_last:
            # Zero borders are written once; each chunk overwrites only the interior.
            self.pad_buffer = xp.zeros((chunk, g.hp, g.wp, g.c), dtype) if g.padded else None
            self.cols = xp.empty((g.groups, rows, g.k), dtype)
        else:
            self.pad_buffer = xp.zeros((chunk, g.c, g.hp, g.wp), dtype) if g.padded else None
            self.cols = xp.empty((g.groups, g.k, rows), dtype)

    def __call__(self, start, stop):
        """The (groups, rows, kh*kw*Cg) column matrix of images start..stop."""
        g, xp, n = self.geo, self.xp, stop - start
        rows = n * g.out_h * g.out_w
        if self.channels_last:
            chunk = self.x[start:stop].transpose(0, 2, 3, 1)
            if self.direct:
                return chunk.reshape(rows, g.groups, g.cg).transpose(1, 0, 2)
            source = chunk
            if self.pad_buffer is not None:
                source = self.pad_buffer[:n]
                g.interior(source)[...] = chunk
            cols = self.cols[:, :rows]
            cols.reshape(g.groups, n, g.out_h, g.out_w, g.kh, g.kw, g.cg)[...] = g.windows(xp, source)
            return cols
        source = self.x[start:stop]
        if self.pad_buffer is not None:
            source = self.pad_buffer[:n]
            g.interior(source, channels_last=False)[...] = self.x[start:stop]
        cols_t = self.cols[:, :, :rows]
        cols_t.reshape(g.groups, g.kh, g.kw, g.cg, n, g.out_h, g.out_w)[...] = g.windows_channels_first(xp, source)
        return cols_t.transpose(0, 2, 1)


def _image_parts(xp, geo, work, itemsize):
    """work(start, stop) over parts of the batch: on the CPU's threads (distprop.cpu_threads),
    each part at least _MIN_THREAD_BYTES of columns; on the GPU as one call. Returns
    the parts' results."""
    if xp is not np:
        return [work(0, geo.n)]
    min_images = max(1, _MIN_THREAD_BYTES // geo.column_bytes_per_image(itemsize))
    return cpu_threads.map_parts(work, geo.n, min_per_part=min_images)


def _chunks(start, stop, chunk):
    """(first, last) image ranges of at most `chunk` images covering start..stop."""
    return [(first, min(first + chunk, stop)) for first in range(start, stop, chunk)]


def _convolve(xp, x, w_mat, geo, bias=None):
    """The convolution of x (N, C, H, W) as an (N*Ho*Wo, O) row matrix (NHWC order):
    im2col and one GEMM per chunk of images, the bias added while the chunk's rows
    are in cache."""
    dtype = xp.result_type(x, w_mat)
    chunk = geo.images_per_chunk(xp, np.dtype(dtype).itemsize)
    rows_per_image = geo.out_h * geo.out_w
    y = xp.empty((geo.n * rows_per_image, geo.o), dtype)
    y_groups = y.reshape(-1, geo.groups, geo.og).transpose(1, 0, 2)

    def work(start, stop):
        columns = _ColumnBuilder(xp, geo, x, chunk, dtype)
        for first, last in _chunks(start, stop, chunk):
            rows = slice(first * rows_per_image, last * rows_per_image)
            if geo.groups == 1:
                cpu_threads.matmul(columns(first, last)[0], w_mat[0], out=y[rows])
            else:
                y_groups[:, rows] = cpu_threads.matmul(columns(first, last), w_mat)
            if bias is not None:
                channel_op(xp, xp.add, y[rows], bias, out=y[rows])

    _image_parts(xp, geo, work, np.dtype(dtype).itemsize)
    return y


def _weight_gradient(xp, x, gy_groups, geo):
    """(O, Cg, kh, kw) gradient: per chunk, the recomputed column matrix's transpose
    times the output gradient, summed over chunks (and over the threads' parts).
    (K, O) = cols^T @ gy runs faster than its transpose gy^T @ cols: the long
    reduction is over the rows of both."""
    chunk = geo.images_per_chunk(xp, gy_groups.dtype.itemsize)
    rows_per_image = geo.out_h * geo.out_w

    def work(start, stop):
        columns = _ColumnBuilder(xp, geo, x, chunk, gy_groups.dtype)
        gw = xp.zeros((geo.groups, geo.k, geo.og), gy_groups.dtype)
        for first, last in _chunks(start, stop, chunk):
            gy_chunk = gy_groups[:, first * rows_per_image:last * rows_per_image]
            cols = columns(first, last)
            for group in range(geo.groups):  # 2-d products: cpu_threads blocks the narrow ones
                gw[group] += cpu_threads.matmul(cols[group].T, gy_chunk[group])
        return gw

    parts = _image_parts(xp, geo, work, gy_groups.dtype.itemsize)
    gw = parts[0]
    for part in parts[1:]:
        gw += part
    return geo.weight_from_matrix(xp, gw)


def _col2im_input_gradient(xp, gy_groups, weight, geo):
    """(N, H, W, C) input gradient by col2im: per chunk, one GEMM per kernel offset
    gives that offset's (rows, Cg) contribution, added onto the padded gradient with
    one strided add per offset."""
    g, offsets = geo.groups, geo.kh * geo.kw
    chunk = geo.images_per_chunk(xp, gy_groups.dtype.itemsize)
    rows_per_image = geo.out_h * geo.out_w
    w_offsets = weight.reshape(g, geo.og, geo.cg, offsets).transpose(3, 0, 1, 2)  # (kh*kw, G, Og, Cg)
    gx_padded = xp.zeros((geo.n, geo.hp, geo.wp, geo.c), gy_groups.dtype)

    def work(start, stop):  # parts write disjoint images of gx_padded
        for first, last in _chunks(start, stop, chunk):
            n = last - first
            gy_chunk = gy_groups[:, first * rows_per_image:last * rows_per_image]
            contributions = cpu_threads.matmul(gy_chunk, w_offsets)  # (kh*kw, G, rows, Cg)
            target = gx_padded[first:last].reshape(n, geo.hp, geo.wp, g, geo.cg)
            for offset in range(offsets):
                i, j = divmod(offset, geo.kw)
                part = contributions[offset].reshape(g, n, geo.out_h, geo.out_w, geo.cg)
                geo.offset_view(target, i, j)[...] += part.transpose(1, 2, 3, 0, 4)

    _image_parts(xp, geo, work, gy_groups.dtype.itemsize)
    return geo.interior(gx_padded)


class Conv2d(Function):
    """conv2d forward and backward; see the module docstring for the scheme."""

    def __init__(self, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x, weight, bias=None):
        xp = get_array_module(x)
        pad_h, pad_w = _padding_per_side(self.padding, weight.shape[2:], self.dilation, self.stride)
        geo = ConvGeometry(x.shape, weight.shape, self.stride, self.dilation, pad_h, pad_w, self.groups)
        y = _convolve(xp, x, geo.weight_matrix(weight), geo, bias)
        self.geo = geo
        self.x = x if self.needs_input_grad[1] else None
        self.weight = weight if self.needs_input_grad[0] else None
        return y.reshape(geo.n, geo.out_h, geo.out_w, geo.o).transpose(0, 3, 1, 2)

    def backward(self, gy):
        xp = get_array_module(gy)
        geo, needs = self.geo, self.needs_input_grad
        # (N*Ho*Wo, O): a view when gy is channels-last in memory, as conv2d's output is.
        gy_rows = gy.transpose(0, 2, 3, 1).reshape(-1, geo.o)
        gy_groups = gy_rows.reshape(-1, geo.groups, geo.og).transpose(1, 0, 2)
        gx = gw = None
        if needs[0]:
            transposed = geo.input_gradient_geometry()
            if transposed is None:
                gx_nhwc = _col2im_input_gradient(xp, gy_groups, self.weight, geo)
            else:
                w_mat = transposed.weight_matrix(geo.flipped_kernel(self.weight))
                gy_channels_last = gy_rows.reshape(geo.n, geo.out_h, geo.out_w, geo.o).transpose(0, 3, 1, 2)
                gx_nhwc = _convolve(xp, gy_channels_last, w_mat, transposed).reshape(geo.n, geo.h, geo.w, geo.c)
            gx = gx_nhwc.transpose(0, 3, 1, 2)
        if needs[1]:
            gw = _weight_gradient(xp, self.x, gy_groups, geo)
        if len(needs) == 2:
            return gx, gw
        return gx, gw, (channel_sum(xp, gy_rows) if needs[2] else None)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """2-d cross-correlation of x (N, C, H, W) with weight (out, C/groups, kh, kw).

    stride, padding and dilation are an int or a pair (height, width); padding may
    also be 'valid' or 'same'. The result is (N, out, Ho, Wo), stored channels-last.
    """
    stride, dilation = as_pair(stride, "conv2d: stride"), as_pair(dilation, "conv2d: dilation")
    if min(stride + dilation) < 1:
        raise ValueError(f"conv2d: stride and dilation must be positive, got {stride}, {dilation}")
    function = Conv2d(stride, padding, dilation, int(groups))
    if bias is None:
        return function(x, weight)
    return function(x, weight, bias)
