"""Bounded image decoding: file bytes in, a greyscale float array out. No I/O beyond `read_image_file`.

Camera images arrive as raw PNG/JPEG/TIFF/BMP bytes, 8 or 16 bit, greyscale or colour. They are
decoded to one (H, W) float32 array in [0, 1]; colour becomes luminance (ITU-R 601: 0.299 R +
0.587 G + 0.114 B). Anything that cannot be scored raises `ImageRejected` with the dead-letter reason::

    image = decode_image(png_bytes)            # (1024, 1024) float32 in [0, 1]
    decode_image(b"")                          # ImageRejected: empty_image: ...
    decode_image(bomb)                         # ImageRejected: image_too_large: ... (header only)

The size limits are checked from the header, before any pixel is decompressed, so a small file
that claims 20000×20000 pixels costs nothing. A JPEG's scans are counted before decoding too
(`jpeg_segment_markers`), as each scan of a progressive JPEG costs a pass over every coefficient.
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (Pillow's default): a truncated file is
then an error, not a silently grey image.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from schemas import DeadReason

ACCEPTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_SIDE = 8192
DEFAULT_MIN_SIDE = 8
JPEG_MAX_SCANS = 64
"""Most scans (SOS markers) a JPEG may have. Baseline JPEGs have 1 scan per component or 1 in all,
progressive ones about 6 (greyscale) to 10 (colour). libjpeg re-walks every coefficient of the image
for each scan, so an AC scan of only 33 bytes costs ~2.5-10 ms of CPU on a 4096² image (measured with
Pillow 13 / libjpeg-turbo): a 66 KB progressive JPEG with that scan repeated 2000 times decodes for
~5 s or more, and a 16 MiB body would take ~20 min. 64 scans bound a 4096² decode to well under 1 s."""
JPEG_MAX_SEGMENTS = 1024
"""Most marker segments (tables, APPn, COM, scans) a JPEG may have; real files have tens. Walking them
costs Pillow's header parser and ours ~1-2 µs each, so 16 MiB of empty 4-byte COM segments would cost
seconds before a pixel is decoded."""
_JPEG_SOI = b"\xff\xd8"
_JPEG_NEXT_MARKER = re.compile(rb"\xff([^\x00\x01\xd0-\xd7\xff])")
"""The next marker that is neither stuffing (FF 00), fill (FF FF), TEM nor a restart marker (RSTn),
found the way libjpeg finds it: bytes before it (entropy-coded data, fill, garbage) are skipped. One FF
and one byte, no repetition: the search stays linear on a run of FF bytes."""
_JPEG_EOI = 0xD9
_JPEG_SOS = 0xDA
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageRejected(Exception):
    """An image that cannot be scored; ``reason`` is the dead-letter reason, ``detail`` what was wrong."""

    def __init__(self, reason: DeadReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _open(data: bytes) -> Image.Image:
    """Parse the header only (Pillow decodes pixels lazily, in ``load``)."""
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(DeadReason.IMAGE_TOO_LARGE, f"decompression-bomb guard: {exc}") from exc
    except UnidentifiedImageError as exc:
        msg = f"not a {'/'.join(ACCEPTED_FORMATS)} image ({len(data)} bytes, starts {bytes(data[:8])!r})"
        raise ImageRejected(DeadReason.UNDECODABLE_IMAGE, msg) from exc
    except Exception as exc:  # any parser error on hostile bytes is "undecodable", never a crash
        raise ImageRejected(DeadReason.UNDECODABLE_IMAGE, f"cannot parse image header: {exc}") from exc


def jpeg_segment_markers(data: bytes) -> Iterator[int]:
    """The marker byte of each segment of JPEG ``data`` after SOI, in order, up to EOI or the end of the data.

    Walks the segments as libjpeg reads them: each payload (APPn with an EXIF thumbnail, COM, tables,
    scan headers) is skipped by its length field, and the entropy-coded data after a scan header is
    searched for the next marker (``FF 00`` is an escaped data byte, ``FF D0``-``FF D7`` restart
    markers, skipped). Data that ends early is left for the decoder to reject as truncated; a segment
    whose length is under 2 or runs past the end, or a second SOI, raises `ImageRejected`
    (``UNDECODABLE_IMAGE``)::

        [f"{m:02X}" for m in jpeg_segment_markers(baseline_jpeg)]  # ['E0', 'DB', 'C0', 'C4', 'DA']
    """
    position = len(_JPEG_SOI)
    while (found := _JPEG_NEXT_MARKER.search(data, position)) is not None:
        marker = found.group(1)[0]
        if marker == _JPEG_EOI:
            return
        start = found.end()
        length = int.from_bytes(data[start : start + 2], "big")
        if marker == _JPEG_SOI[1] or length < 2 or start + length > len(data):
            msg = (
                f"corrupt or truncated JPEG: marker FF {marker:02X} at byte {found.start()} claims a "
                f"{length}-byte segment, {len(data) - start} bytes are left"
            )
            raise ImageRejected(DeadReason.UNDECODABLE_IMAGE, msg)
        yield marker
        position = start + length


def _check_jpeg_scans(data: bytes) -> None:
    """Reject a JPEG with more than `JPEG_MAX_SCANS` scans or `JPEG_MAX_SEGMENTS` segments, before decoding.

    Stops counting at the first segment over a limit, so the walk itself stays cheap.
    """
    if bytes(data[: len(_JPEG_SOI)]) != _JPEG_SOI:
        return
    scans = 0
    for segments, marker in enumerate(jpeg_segment_markers(data), start=1):
        if segments > JPEG_MAX_SEGMENTS:
            msg = f"JPEG with more than {JPEG_MAX_SEGMENTS} marker segments; at most {JPEG_MAX_SEGMENTS} are allowed"
            raise ImageRejected(DeadReason.IMAGE_TOO_LARGE, msg)
        scans += marker == _JPEG_SOS
        if scans > JPEG_MAX_SCANS:
            msg = f"JPEG with at least {scans} scans (SOS markers); at most {JPEG_MAX_SCANS} are allowed"
            raise ImageRejected(DeadReason.IMAGE_TOO_LARGE, msg)


def _check_size(image: Image.Image, max_pixels: int, max_side: int, min_side: int) -> None:
    width, height = image.size
    if width * height > max_pixels or max(width, height) > max_side:
        msg = f"{width}×{height} image; at most {max_pixels} pixels and {max_side} px per side are allowed"
        raise ImageRejected(DeadReason.IMAGE_TOO_LARGE, msg)
    if min(width, height) < min_side:
        msg = f"{width}×{height} image; each side must be at least {min_side} px"
        raise ImageRejected(DeadReason.IMAGE_TOO_SMALL, msg)


def _check_mode(image: Image.Image) -> None:
    if getattr(image, "is_animated", False):
        msg = f"multi-frame {image.format} image; expected a single frame"
        raise ImageRejected(DeadReason.UNSUPPORTED_IMAGE_MODE, msg)
    if image.mode not in _EIGHT_BIT_MODES | _SIXTEEN_BIT_MODES:
        supported = ", ".join(sorted(_EIGHT_BIT_MODES | _SIXTEEN_BIT_MODES))
        msg = f"{image.format} image in mode {image.mode!r}; expected one of {supported}"
        raise ImageRejected(DeadReason.UNSUPPORTED_IMAGE_MODE, msg)


def _to_grey(image: Image.Image) -> np.ndarray:
    """Convert a loaded image to (H, W) float32 in [0, 1]."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if mode == "I" and (values.min(initial=0) < 0 or values.max(initial=0) > 65535):
            msg = "32-bit integer image with values outside 0..65535; expected 8- or 16-bit data"
            raise ImageRejected(DeadReason.UNSUPPORTED_IMAGE_MODE, msg)
        return (values.astype(np.float32) / np.float32(65535.0)).astype(np.float32)
    if mode in {"P", "PA"}:
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
        mode = image.mode
    if mode == "1":
        image = image.convert("L")
        mode = "L"
    values = np.asarray(image)
    if mode in {"L", "LA"}:
        grey = values if values.ndim == 2 else values[..., 0]
        return grey.astype(np.float32) / np.float32(255.0)
    grey = np.zeros(values.shape[:2], dtype=np.float32)
    for channel, weight in enumerate(_LUMA / np.float32(255.0)):  # one channel at a time; alpha ignored
        grey += weight * values[..., channel]
    return np.clip(grey, 0.0, 1.0)


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Decode image file bytes to a greyscale (H, W) float32 array in [0, 1].

    8-bit data is divided by 255, 16-bit data by 65535; RGB(A) becomes luminance (alpha ignored);
    palette and 1-bit images are expanded first. Raises `ImageRejected` with reason
    ``EMPTY_IMAGE`` (zero bytes), ``UNDECODABLE_IMAGE`` (not an accepted format, corrupt or truncated),
    ``IMAGE_TOO_LARGE`` (more than ``max_pixels`` or a side over ``max_side``, read from the header
    before decoding; a JPEG with more than `JPEG_MAX_SCANS` scans or `JPEG_MAX_SEGMENTS` segments),
    ``IMAGE_TOO_SMALL`` (a side under ``min_side``) or ``UNSUPPORTED_IMAGE_MODE`` (float, CMYK, LAB,
    signed 32-bit data, multi-frame files). No other exception escapes.
    """
    if len(data) == 0:
        raise ImageRejected(DeadReason.EMPTY_IMAGE, "image has zero bytes")
    _check_jpeg_scans(data)
    image = _open(data)
    try:
        _check_size(image, max_pixels, max_side, min_side)
        try:
            _check_mode(image)
            image.load()
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(DeadReason.IMAGE_TOO_LARGE, f"decompression-bomb guard: {exc}") from exc
        except Exception as exc:
            msg = f"cannot decode {image.format} pixel data (corrupt or truncated): {exc}"
            raise ImageRejected(DeadReason.UNDECODABLE_IMAGE, msg) from exc
        try:
            grey = _to_grey(image)
        except ImageRejected:
            raise
        except Exception as exc:
            msg = f"cannot convert {image.format} mode {image.mode!r} to greyscale: {exc}"
            raise ImageRejected(DeadReason.UNSUPPORTED_IMAGE_MODE, msg) from exc
    finally:
        image.close()
    return np.ascontiguousarray(grey, dtype=np.float32)


def integer_levels(image: np.ndarray) -> np.ndarray:
    """The integer levels of a decoded (H, W) float image in [0, 1], without losing what the model sees.

    uint8 when every value is k/255 (what `decode_image` makes of 8-bit greyscale data), else uint16
    rounded to 1/65535 (16-bit data exactly; the float luminance of colour sources to within 1/131070).
    ``integer_levels(decode_image(data)) / 255`` (or ``/ 65535``) is then what the scorers get from
    ``data``, so a model trains on the pixels it will later score. Shape kept.
    """
    array = np.asarray(image, dtype=np.float32)
    levels = array * np.float32(255.0)
    eight_bit = np.rint(levels)
    if np.abs(levels - eight_bit).max(initial=0.0) < 1e-3:
        return np.clip(eight_bit, 0, 255).astype(np.uint8)
    return np.clip(np.rint(array * np.float32(65535.0)), 0, 65535).astype(np.uint16)


def encode_png(image: np.ndarray, compress_level: int = 3) -> bytes:
    """Encode an image as PNG bytes (lossless, deterministic).

    Accepts (H, W) or (H, W, 3) arrays: uint8 as is; uint16 (H, W) as a 16-bit greyscale PNG; bool
    as 0/255 (masks); float in [0, 1] scaled to uint8 by rounding. Raises ValueError otherwise.
    ``compress_level`` is zlib's (0-9): the same pixels either way; 1 writes a 1024² RGB overlay in
    ~50 ms instead of ~70 ms at 3, ~20 % larger.
    """
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        msg = f"expected an (H, W) or (H, W, 3) array, got shape {array.shape}"
        raise ValueError(msg)
    if array.size == 0:
        msg = f"cannot encode an empty image of shape {array.shape}"
        raise ValueError(msg)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * np.uint8(255)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            msg = f"float image must be finite and in [0, 1], got range [{array.min()}, {array.max()}]"
            raise ValueError(msg)
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype == np.uint16 and array.ndim == 2:
        pass
    elif array.dtype != np.uint8:
        msg = f"expected uint8, bool, float in [0, 1] or (H, W) uint16, got dtype {array.dtype}"
        raise ValueError(msg)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def read_image_file(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Read and decode an image file to (H, W) float32 in [0, 1] (see `decode_image`).

    A file that cannot be read raises `ImageRejected` with reason ``MISSING_OBJECT``; a decoding
    problem keeps its reason. Either way the detail names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageRejected(DeadReason.MISSING_OBJECT, f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return decode_image(data, max_pixels=max_pixels, max_side=max_side, min_side=min_side)
    except ImageRejected as exc:
        raise ImageRejected(exc.reason, f"{path}: {exc.detail}") from exc
