"""Textbook lossy codecs for density maps, and the bit budget of a model's latent.

They are the classical anchor of a learned latent (GUIDE section 7): a report scores a model
and these codecs given the same number of bits per map, so it shows what the latent buys over a
wavelet or DCT coder.

Every codec writes a real bitstream, and its size is what counts: ``len(encode(v, bits)) * 8``
never exceeds ``bits`` (header included), and ``decode`` rebuilds the map from those bytes and
the shape alone. The entropy coder is LZMA (raw LZMA2, no container header) over LEB128 varints:
not the best a wavelet coder can do (a context-modelling arithmetic coder, as in JPEG 2000, would
shrink the streams further), but honest, short and standard.

- ``wavelet``: a 3-D discrete wavelet transform (bior4.4, the JPEG 2000 9/7 filters, 3 levels,
  periodised so that a 64³ map gives exactly 64³ coefficients), a uniform quantizer, and the
  nonzero quantized coefficients written as gaps between their positions, magnitudes and signs.
  The step is the one free parameter: the smallest step whose stream fits the budget, found by
  bisection; the coefficients kept are the largest ones, those that do not round to zero.
- ``dct``: a low-pass DCT coder: the orthonormal 3-D DCT-II, the coefficients inside a sphere
  of radius r around the zero frequency, uniformly quantized and written in order of radius.
  Radius and step are chosen together for the least error (the transform is orthonormal, so the
  error is summed over coefficients, without an inverse transform).

A model's latent is counted two ways: ``latent_bits``, its code indices at a fixed width, and
``index_stream``, a real stream of one map's indices, whose size is what the codecs are compared
at (fixed-width indices spend as many bits on the empty solvent as on the particle).

Shapes: a volume is (D, H, W) float; decode returns float32 of the shape given.
"""

from __future__ import annotations

import lzma
import math
import struct
import warnings
from functools import lru_cache
from typing import Protocol

import numpy as np

# LZMA2 at the default preset, without the .xz container: a header costs bits we count.
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
_QUICK_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 1}]  # only to rank choices: much faster
_HEADER = struct.Struct("<fI")  # quantizer step (float32), a count (uint32)
_SEARCH_TOLERANCE = 1e-3  # bisection stops when two steps differ by less than this ratio
FLOAT_BITS = 32
_PACKED_STREAM, _LZMA_STREAM = 0, 1  # the first byte of an index stream


class Codec(Protocol):
    """A lossy codec that fits a map into a bit budget."""

    name: str

    def encode(self, volume_DHW: np.ndarray, bits: int) -> bytes:
        """A stream of at most ``bits`` bits (``len(blob) * 8 <= bits``)."""

    def decode(self, blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """The map rebuilt from the stream alone. Shape: ``shape``, float32."""


class BudgetTooSmall(ValueError):
    """Even an empty stream (the header) does not fit the budget."""


# --------------------------------------------------------------------------------------------
# The bit budget of a model's latent


def latent_bits(model, box: int = 64) -> dict[str, int]:
    """Bits per map of each latent level, for a ``box``³ input.

    A quantized level costs ceil(log2(codebook size)) bits per code index, over all its scales;
    a continuous level (the VAEs' Gaussian latents) 32 bits per float, the float32 it is
    stored as (an upper bound: what it carries is bounded by its KL term, not by its width).
    The code map sizes are read from one ``encode`` of a zero volume; the codebooks' usage
    counts are left as they were.
    """
    import torch

    books = model.codebooks()
    counts = {level: book.counts.clone() for level, book in books.items()}
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    try:
        model.eval()
        with torch.inference_mode():
            codes = model.encode(torch.zeros(1, 1, box, box, box, device=device)).codes
    finally:
        model.train(was_training)
        for level, book in books.items():
            book.counts.copy_(counts[level])
    bits = {}
    for level, tensors in codes.items():
        values = sum(t[0].numel() for t in tensors)  # one map of the batch
        if tensors[0].is_floating_point():
            bits[level] = values * FLOAT_BITS
        else:
            bits[level] = values * index_width(books[level].size)
    return bits


def index_width(codebook_size: int) -> int:
    """Bits per code index at a fixed width: ceil(log2(codebook size))."""
    return math.ceil(math.log2(codebook_size))


def index_stream(indices: np.ndarray, codebook_size: int) -> bytes:
    """One map's code indices at one level (its scales flattened in order) as a real stream.

    The stream is the shorter of two: the indices packed at ``index_width`` bits each (what
    ``latent_bits`` counts), or LZMA over them as 16-bit integers. One leading byte says which.
    LZMA wins where codes repeat, as over the flat solvent around a particle, where every
    position takes the same few codes; a wavelet codec gets that region almost free, so a
    model's latent is compared with it at this size, not at the fixed width.
    """
    indices = np.asarray(indices).ravel()
    if codebook_size > 1 << 16:
        raise ValueError(f"codebooks of over 65,536 codes do not fit 16-bit indices ({codebook_size})")
    if indices.size and (indices.min() < 0 or indices.max() >= codebook_size):
        raise ValueError(f"code indices must lie in [0, {codebook_size})")
    width = index_width(codebook_size)
    bits_IW = (indices.astype(np.int64)[:, None] >> np.arange(width - 1, -1, -1)) & 1
    packed = np.packbits(bits_IW.astype(np.uint8).ravel()).tobytes()
    squeezed = lzma.compress(indices.astype("<u2").tobytes(), format=lzma.FORMAT_RAW,
                             filters=_FILTERS)
    return bytes([_LZMA_STREAM]) + squeezed if len(squeezed) < len(packed) else (
        bytes([_PACKED_STREAM]) + packed)


def read_index_stream(blob: bytes, count: int, codebook_size: int) -> np.ndarray:
    """The ``count`` code indices of an ``index_stream`` (int64)."""
    kind, body = blob[0], blob[1:]
    if kind == _LZMA_STREAM:
        raw = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=_FILTERS)
        return np.frombuffer(raw, "<u2")[:count].astype(np.int64)
    if kind != _PACKED_STREAM:
        raise ValueError(f"corrupt index stream: unknown kind {kind}")
    width = index_width(codebook_size)
    bits_IW = np.unpackbits(np.frombuffer(body, np.uint8))[: count * width].reshape(count, width)
    return (bits_IW.astype(np.int64) << np.arange(width - 1, -1, -1)).sum(axis=1)


# --------------------------------------------------------------------------------------------
# The codecs


class WaveletCodec:
    """3-D wavelet transform, uniform quantizer, nonzero coefficients as gaps + magnitudes + signs.

    Stream: header (step, count K) | K sign bits, packed | LZMA(varint gaps, varint |q| − 1).
    Gaps are the zero runs between nonzero coefficients in subband order (coarse to fine), so
    the clusters where the density is give small gaps that LZMA codes cheaply.
    """

    name = "wavelet"

    def __init__(self, wavelet: str = "bior4.4", levels: int = 3):
        # Periodisation keeps 64³ coefficients for a 64³ map and wraps at the box edge, which
        # the flat background of a masked map makes harmless. pywt warns that 3 levels of a
        # 10-tap filter on 64 voxels feel the boundary everywhere; with wrapping that is fine.
        self.wavelet, self.levels, self.mode = wavelet, levels, "periodization"

    def encode(self, volume_DHW: np.ndarray, bits: int) -> bytes:
        coeffs_N = self._analyse(np.asarray(volume_DHW, np.float64))
        top = float(np.abs(coeffs_N).max(initial=0.0))
        return _smallest_step_that_fits(lambda step: self._stream(coeffs_N, step), bits, top)[1]

    def decode(self, blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
        import pywt

        step, count = _HEADER.unpack_from(blob)
        sign_bytes = (count + 7) // 8
        negative = np.unpackbits(np.frombuffer(blob, np.uint8, sign_bytes, _HEADER.size))[:count]
        body = _read_varints(lzma.decompress(blob[_HEADER.size + sign_bytes:],
                                             format=lzma.FORMAT_RAW, filters=_FILTERS), 2 * count)
        gaps, magnitudes = body[:count].astype(np.int64), body[count:].astype(np.int64) + 1
        layout = self._layout(tuple(shape))
        q_N = np.zeros(layout[-1][1], np.int64)
        q_N[np.cumsum(gaps + 1) - 1] = np.where(negative == 1, -magnitudes, magnitudes)
        coeffs = [None] + [{} for _ in range(self.levels)]
        for (level, key, band_shape), (start, stop) in zip(self._bands(tuple(shape)), layout):
            band = (q_N[start:stop] * np.float64(step)).reshape(band_shape)
            if key is None:
                coeffs[0] = band
            else:
                coeffs[level][key] = band
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            volume = pywt.waverecn(coeffs, self.wavelet, mode=self.mode)
        return volume[tuple(slice(0, n) for n in shape)].astype(np.float32)

    def _stream(self, coeffs_N: np.ndarray, step: float) -> tuple[bytes, float]:
        """The stream at one quantizer step, and its squared error in coefficient space (a
        guide only: bior4.4 is close to, not exactly, orthonormal)."""
        step = float(np.float32(step))  # the header's precision, so decode uses the same step
        q_N = np.rint(coeffs_N / step).astype(np.int64)
        kept = np.flatnonzero(q_N)
        gaps = np.diff(kept, prepend=-1) - 1
        body = _varints(gaps) + _varints(np.abs(q_N[kept]) - 1)
        blob = (_HEADER.pack(step, len(kept)) + np.packbits(q_N[kept] < 0).tobytes()
                + lzma.compress(body, format=lzma.FORMAT_RAW, filters=_FILTERS))
        return blob, float(((coeffs_N - q_N * step) ** 2).sum())

    def _analyse(self, volume: np.ndarray) -> np.ndarray:
        """Coefficients as one vector: the approximation, then detail bands coarse to fine."""
        import pywt

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            coeffs = pywt.wavedecn(volume, self.wavelet, mode=self.mode, level=self.levels)
        bands = [coeffs[0]] + [coeffs[level][key] for level in range(1, self.levels + 1)
                               for key in sorted(coeffs[level])]
        return np.concatenate([b.ravel() for b in bands])

    def _bands(self, shape: tuple[int, ...]) -> list[tuple[int, str | None, tuple[int, ...]]]:
        """(level, detail key, band shape) in the order of ``_analyse``."""
        import pywt

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            shapes = pywt.wavedecn_shapes(shape, self.wavelet, mode=self.mode, level=self.levels)
        return [(0, None, tuple(shapes[0]))] + [
            (level, key, tuple(shapes[level][key]))
            for level in range(1, self.levels + 1) for key in sorted(shapes[level])]

    def _layout(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        sizes = [math.prod(band_shape) for _, _, band_shape in self._bands(shape)]
        stops = np.cumsum(sizes).tolist()
        return list(zip([0] + stops[:-1], stops))


class DctCodec:
    """Low-pass DCT: the coefficients within radius r of the zero frequency, quantized.

    Stream: header (step, count n) | LZMA(varint zigzag(q)) for the n lowest frequencies in
    order of radius. The encoder tries radii on a geometric grid and keeps the (radius, step)
    pair with the least error that fits.
    """

    name = "dct"

    def encode(self, volume_DHW: np.ndarray, bits: int) -> bytes:
        from scipy.fft import dctn

        volume = np.asarray(volume_DHW, np.float64)
        coeffs_N = dctn(volume, norm="ortho").ravel()[_radial_order(volume.shape)]
        top = float(np.abs(coeffs_N).max(initial=0.0))
        energy_after = np.append(np.cumsum((coeffs_N ** 2)[::-1])[::-1], 0.0)  # of n…end

        def at(count, filters=_FILTERS):
            return lambda step: self._stream(coeffs_N, count, step, energy_after, filters)

        # Rank the radii with a coarse step search and a quicker LZMA (its streams are a few
        # per cent larger), from small to large, warm-started from the previous radius's step;
        # stop once the error has grown for three radii in a row. The stream sent is then
        # searched again at the chosen radius with the real coder.
        best, guess, worse = None, None, 0
        for count in _radial_counts(volume.shape):
            try:
                error, blob, guess = _smallest_step_that_fits(at(count, _QUICK_FILTERS), bits,
                                                              top, guess, 0.02)
            except BudgetTooSmall:
                break  # a larger sphere costs more even when empty
            if best is None or error < best[0]:
                best, worse = (error, count, guess), 0
            else:
                worse += 1
                if worse == 3:
                    break
        if best is None:
            raise BudgetTooSmall(f"a budget of {bits} bits cannot hold one DCT coefficient")
        _, count, step = best
        return _smallest_step_that_fits(at(count), bits, top, step)[1]

    def decode(self, blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
        from scipy.fft import idctn

        step, count = _HEADER.unpack_from(blob)
        body = lzma.decompress(blob[_HEADER.size:], format=lzma.FORMAT_RAW, filters=_FILTERS)
        zigzag = _read_varints(body, count)
        half = (zigzag >> np.uint64(1)).astype(np.int64)
        q = np.where(zigzag & np.uint64(1), -half - 1, half)  # 2q ↦ q, −2q − 1 ↦ q < 0
        coeffs = np.zeros(math.prod(shape))
        coeffs[_radial_order(tuple(shape))[:count]] = q * np.float64(step)
        return idctn(coeffs.reshape(shape), norm="ortho").astype(np.float32)

    @staticmethod
    def _stream(coeffs_N, count, step, energy_after, filters=_FILTERS) -> tuple[bytes, float]:
        step = float(np.float32(step))  # the header's precision, so decode uses the same step
        q = np.rint(coeffs_N[:count] / step).astype(np.int64)
        zigzag = np.where(q < 0, -2 * q - 1, 2 * q)
        blob = _HEADER.pack(step, count) + lzma.compress(_varints(zigzag), format=lzma.FORMAT_RAW,
                                                         filters=filters)
        return blob, float(((coeffs_N[:count] - q * step) ** 2).sum() + energy_after[count])


CODECS: dict[str, Codec] = {"wavelet": WaveletCodec(), "dct": DctCodec()}
CODEC_NAMES = tuple(CODECS)


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose from {', '.join(CODEC_NAMES)}")
    return CODECS[name]


# --------------------------------------------------------------------------------------------
# Helpers: the step search, radial order, varints


def _smallest_step_that_fits(stream, bits: int, top: float, guess: float | None = None,
                             tolerance: float = _SEARCH_TOLERANCE) -> tuple[float, bytes, float]:
    """(error, blob, step) at the smallest quantizer step whose stream fits ``bits``.

    ``stream(step)`` gives (blob, error); ``top`` is the largest coefficient magnitude, so a
    step of 4 × top sends no coefficient. From ``guess`` (default that step) the step moves by
    4× until one fits and the next does not, then bisects (in log step) down to a ratio of
    1 + ``tolerance``. The size is nearly monotone in the step; where it is not, the search
    still returns a stream that fits.
    """
    ceiling = max(top, 1e-30) * 4.0
    floor = ceiling * 1e-8  # below this a float32 step is lossless in practice

    def attempt(step):
        blob, error = stream(step)
        return (step, blob, error) if len(blob) * 8 <= bits else None

    # Bracket: `fits` is the smallest step known to fit, `fails` a smaller one that does not.
    step = min(guess or ceiling, ceiling)
    fits, fails = attempt(step), None
    if fits is None:  # grow the step until the stream fits
        while fits is None:
            if step >= ceiling:
                size = len(stream(ceiling)[0]) * 8
                raise BudgetTooSmall(f"a budget of {bits} bits is below the {size} bits of an "
                                     "empty stream")
            fails, step = step, min(step * 4.0, ceiling)
            fits = attempt(step)
    else:  # shrink it until the stream no longer fits
        while fails is None and step > floor:
            step /= 4.0
            smaller = attempt(step)
            fits, fails = (smaller, None) if smaller else (fits, step)
    while fails is not None and fits[0] / fails > 1 + tolerance:
        step = math.sqrt(fits[0] * fails)
        smaller = attempt(step)
        fits, fails = (smaller, fails) if smaller else (fits, step)
    return fits[2], fits[1], fits[0]


def _radii(shape: tuple[int, ...]) -> np.ndarray:
    """|k| of every DCT coefficient, flat. Shape: prod(shape)"""
    return np.sqrt(sum(k.astype(np.float64) ** 2 for k in np.indices(shape))).ravel()


@lru_cache(maxsize=8)
def _radial_order(shape: tuple[int, ...]) -> np.ndarray:
    """Flat indices of a DCT array sorted by |k| (ties in index order): low-pass first."""
    order = np.argsort(_radii(shape), kind="stable")
    order.setflags(write=False)
    return order


def _radial_counts(shape: tuple[int, ...], ratio: float = 1.25) -> list[int]:
    """How many coefficients lie within radius r, for r on a geometric grid up to the corner."""
    radius_sorted = _radii(shape)[_radial_order(shape)]
    radii, r = [], 1.0
    while r < radius_sorted[-1]:
        radii.append(r)
        r *= ratio
    counts = np.searchsorted(radius_sorted, np.array(radii), side="right").tolist()
    return sorted(set(counts + [len(radius_sorted)]))


def _varints(values: np.ndarray) -> bytes:
    """Non-negative integers as LEB128: 7 bits per byte, high bit set on all but the last."""
    v = np.asarray(values, np.uint64)
    n_bytes = np.ones(v.shape, np.int64)
    for k in range(1, 10):
        n_bytes += v >= np.uint64(1 << (7 * k))
    out = np.zeros(int(n_bytes.sum()), np.uint8)
    starts = np.cumsum(n_bytes) - n_bytes
    for j in range(int(n_bytes.max(initial=0))):
        has = n_bytes > j
        low7 = (v[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (n_bytes[has] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + j] = (low7 | more).astype(np.uint8)
    return out.tobytes()


def _read_varints(data: bytes, count: int) -> np.ndarray:
    """The first ``count`` LEB128 integers of ``data`` (uint64)."""
    b = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if len(ends) < count:
        raise ValueError(f"corrupt stream: {len(ends)} integers where {count} were expected")
    if count == 0:
        return np.zeros(0, np.uint64)
    b = b[:ends[count - 1] + 1]
    starts = np.concatenate([[0], ends[:count - 1] + 1])
    position = np.arange(len(b)) - np.repeat(starts, np.diff(np.append(starts, len(b))))
    shifted = (b & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.add.reduceat(shifted, starts)
