"""Bounded decoding: every bad image becomes an `ImageRejected` with the right dead-letter reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from schemas import DeadReason
from trainer.imaging import (
    JPEG_MAX_SCANS,
    JPEG_MAX_SEGMENTS,
    ImageRejected,
    decode_image,
    encode_png,
    integer_levels,
    jpeg_segment_markers,
    read_image_file,
)


def _save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(h: int = 32, w: int = 48) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def _reason(data: bytes, **kwargs: int) -> DeadReason:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, **kwargs)
    assert str(info.value).startswith(f"{info.value.reason}: ")
    return info.value.reason


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR (with a correct CRC) claims width×height pixels."""
    data = bytearray(encode_png(_gradient(16, 16)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_truncation_is_not_tolerated_globally() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_round_trips_to_float_in_unit_range() -> None:
    image = _gradient()
    decoded = decode_image(encode_png(image))
    assert decoded.dtype == np.float32
    assert decoded.shape == (32, 48)
    np.testing.assert_allclose(decoded, image / 255.0, atol=1e-7)


def test_zero_bytes_is_empty_image() -> None:
    assert _reason(b"") == DeadReason.EMPTY_IMAGE


@pytest.mark.parametrize("data", [b"hello world, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, bytes(range(256))])
def test_garbage_bytes_are_undecodable(data: bytes) -> None:
    assert _reason(data) == DeadReason.UNDECODABLE_IMAGE


@pytest.mark.parametrize("keep", [0.5, 0.8, 0.97])
def test_truncated_png_is_undecodable(keep: float) -> None:
    rng = np.random.default_rng(0)
    data = encode_png(rng.integers(0, 256, (64, 64), dtype=np.uint8))  # noise: does not compress away
    assert _reason(data[: int(len(data) * keep)]) == DeadReason.UNDECODABLE_IMAGE


def test_truncated_jpeg_is_undecodable() -> None:
    rng = np.random.default_rng(1)
    data = _save(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)), "JPEG", quality=95)
    assert _reason(data[: len(data) // 2]) == DeadReason.UNDECODABLE_IMAGE


@pytest.mark.parametrize("side", [20000, 5000])  # over Pillow's own bomb limit, and only over ours
def test_decompression_bomb_header_is_rejected_before_decoding(side: int) -> None:
    bomb = _png_claiming(side, side)
    assert len(bomb) < 2000
    assert _reason(bomb) == DeadReason.IMAGE_TOO_LARGE


def test_side_over_limit_is_too_large_even_with_few_pixels() -> None:
    assert _reason(_png_claiming(9000, 16)) == DeadReason.IMAGE_TOO_LARGE
    assert _reason(encode_png(_gradient(16, 64)), max_side=32) == DeadReason.IMAGE_TOO_LARGE


def test_pixel_count_over_limit_is_too_large() -> None:
    assert _reason(encode_png(_gradient(64, 64)), max_pixels=64 * 63) == DeadReason.IMAGE_TOO_LARGE


def test_tiny_image_is_too_small() -> None:
    assert _reason(encode_png(_gradient(4, 64))) == DeadReason.IMAGE_TOO_SMALL
    assert decode_image(encode_png(_gradient(8, 8))).shape == (8, 8)


def test_rgb_becomes_luminance() -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    decoded = decode_image(encode_png(rgb))
    expected = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255
    assert decoded.shape == (16, 16)
    np.testing.assert_allclose(decoded, expected, atol=1e-6)


def test_rgba_ignores_alpha_and_palette_expands() -> None:
    rgba = np.full((16, 16, 4), 128, dtype=np.uint8)
    rgba[..., 3] = 7
    np.testing.assert_allclose(decode_image(_save(Image.fromarray(rgba), "PNG")), 128 / 255, atol=1e-6)
    palette = Image.fromarray(_gradient(16, 16)).convert("P")
    assert decode_image(_save(palette, "PNG")).shape == (16, 16)


def test_sixteen_bit_png_and_tiff_keep_their_precision() -> None:
    image = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    for data in (encode_png(image), _save(Image.fromarray(image), "TIFF")):
        decoded = decode_image(data)
        np.testing.assert_allclose(decoded, image / 65535.0, atol=1e-7)


def test_integer_levels_keep_eight_bit_data_eight_bit_and_everything_else_sixteen() -> None:
    grey8 = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    grey16 = (np.arange(32 * 32).reshape(32, 32) * 61).astype(np.uint16)
    levels8, levels16 = (
        integer_levels(decode_image(encode_png(grey8))),
        integer_levels(decode_image(encode_png(grey16))),
    )
    assert levels8.dtype == np.uint8 and levels16.dtype == np.uint16
    np.testing.assert_array_equal(levels8, grey8)
    np.testing.assert_array_equal(levels16, grey16)
    between = np.full((4, 4), 0.5 / 255, dtype=np.float32)  # half an 8-bit step: not 8-bit data
    assert integer_levels(between).dtype == np.uint16
    assert integer_levels(np.array([[0.0, 1.0]], dtype=np.float32)).tolist() == [[0, 255]]


def test_one_bit_jpeg_and_bmp_decode() -> None:
    bilevel = Image.fromarray(_gradient(16, 16) > 127).convert("1")
    np.testing.assert_array_equal(decode_image(_save(bilevel, "PNG")), (_gradient(16, 16) > 127).astype(np.float32))
    assert decode_image(_save(Image.fromarray(_gradient()), "JPEG")).shape == (32, 48)
    np.testing.assert_allclose(decode_image(_save(Image.fromarray(_gradient()), "BMP")), _gradient() / 255.0)


def test_float_and_cmyk_modes_are_unsupported() -> None:
    floats = Image.fromarray(np.linspace(0, 3, 256, dtype=np.float32).reshape(16, 16))
    assert _reason(_save(floats, "TIFF")) == DeadReason.UNSUPPORTED_IMAGE_MODE
    cmyk = Image.new("CMYK", (16, 16), (10, 20, 30, 40))
    assert _reason(_save(cmyk, "JPEG")) == DeadReason.UNSUPPORTED_IMAGE_MODE


def test_multi_frame_tiff_is_unsupported() -> None:
    frames = [Image.fromarray(_gradient(16, 16)), Image.fromarray(255 - _gradient(16, 16))]
    data = _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    assert _reason(data) == DeadReason.UNSUPPORTED_IMAGE_MODE


def test_other_formats_are_not_accepted() -> None:
    assert _reason(_save(Image.fromarray(_gradient(16, 16)), "GIF")) == DeadReason.UNDECODABLE_IMAGE


def test_encode_png_rejects_out_of_range_floats_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_png(np.full((8, 8), 1.5, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((8, 8, 2), dtype=np.uint8))
    mask = decode_image(encode_png(np.eye(8, dtype=bool)))
    np.testing.assert_array_equal(mask, np.eye(8, dtype=np.float32))


def test_read_image_file_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(encode_png(_gradient()))
    assert read_image_file(good).shape == (32, 48)
    with pytest.raises(ImageRejected, match=r"missing\.png") as info:
        read_image_file(tmp_path / "missing.png")
    assert info.value.reason == DeadReason.MISSING_OBJECT
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageRejected, match=r"broken\.png") as info:
        read_image_file(broken)
    assert info.value.reason == DeadReason.UNDECODABLE_IMAGE


def _progressive_jpeg() -> bytes:
    rng = np.random.default_rng(2)
    colour = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return _save(colour, "JPEG", progressive=True, quality=90)


def _with_last_scan_repeated(data: bytes, times: int) -> bytes:
    """``data`` (a Pillow JPEG: no EXIF, ends in EOI) with its last scan, header and entropy data, repeated."""
    last_scan = data.rindex(b"\xff\xda")
    assert data.endswith(b"\xff\xd9")
    return data[:-2] + data[last_scan:-2] * times + data[-2:]


def _scans(data: bytes) -> int:
    return sum(marker == 0xDA for marker in jpeg_segment_markers(data))


def test_normal_progressive_and_baseline_jpegs_decode() -> None:
    progressive = _progressive_jpeg()
    baseline = _save(Image.fromarray(_gradient(64, 64)), "JPEG")
    assert 1 < _scans(progressive) <= 12
    assert _scans(baseline) == 1
    assert decode_image(progressive).shape == (64, 64)
    assert decode_image(baseline).shape == (64, 64)


def test_progressive_jpeg_scan_bomb_is_rejected_before_decoding() -> None:
    progressive = _progressive_jpeg()
    extra = JPEG_MAX_SCANS - _scans(progressive)
    at_limit = _with_last_scan_repeated(progressive, extra)
    assert _scans(at_limit) == JPEG_MAX_SCANS
    assert decode_image(at_limit).shape == (64, 64)  # libjpeg decodes a repeated scan: only the count stops it
    with pytest.raises(ImageRejected) as info:
        decode_image(_with_last_scan_repeated(progressive, extra + 1))
    assert info.value.reason == DeadReason.IMAGE_TOO_LARGE
    assert f"{JPEG_MAX_SCANS + 1} scans" in info.value.detail
    assert f"at most {JPEG_MAX_SCANS}" in info.value.detail
    assert _reason(_with_last_scan_repeated(progressive, 2000)) == DeadReason.IMAGE_TOO_LARGE


def test_scan_markers_inside_an_app_segment_are_not_counted() -> None:
    exif = b"Exif\x00\x00" + b"\xff\xda\x00\x08" * 200  # like SOS bytes in an EXIF thumbnail
    data = _save(Image.fromarray(_gradient(64, 64)), "JPEG", exif=exif)
    assert data.count(b"\xff\xda") > JPEG_MAX_SCANS
    assert _scans(data) == 1
    assert decode_image(data).shape == (64, 64)


def test_jpeg_with_too_many_segments_is_too_large() -> None:
    baseline = _save(Image.fromarray(_gradient(64, 64)), "JPEG")
    comments = b"\xff\xfe\x00\x02" * JPEG_MAX_SEGMENTS  # empty COM segments
    with pytest.raises(ImageRejected, match="marker segments") as info:
        decode_image(baseline[:2] + comments + baseline[2:])
    assert info.value.reason == DeadReason.IMAGE_TOO_LARGE


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff\xfe\x00\x01rest",  # segment length under 2
        b"\xff\xd8\xff\xfe\x40\x00short",  # segment longer than the data
        b"\xff\xd8\xff\xfe",  # no room for a length
        b"\xff\xd8\xff\xd8\x00\x10",  # a second SOI
        b"\xff\xd8" + b"\xff" * 1000,  # fill bytes only
    ],
)
def test_corrupt_jpeg_segment_structure_is_undecodable(data: bytes) -> None:
    assert _reason(data) == DeadReason.UNDECODABLE_IMAGE


def test_every_truncation_of_a_progressive_jpeg_is_rejected() -> None:
    data = _progressive_jpeg()
    for end in range(2, len(data) - 2, 7):
        with pytest.raises(ImageRejected):
            decode_image(data[:end])
