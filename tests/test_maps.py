"""Stored anomaly maps: float16 where the values fit (half the bytes), float32 otherwise; read back as float32."""

from __future__ import annotations

import io

import numpy as np

from workers.maps import decode_map, encode_map, stored_map_dtype


def _stored_dtype(data: bytes) -> np.dtype:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return archive["map"].dtype


def test_a_map_is_stored_as_float16_within_its_precision_and_read_back_as_float32() -> None:
    rng = np.random.default_rng(0)
    amap = np.abs(rng.normal(0.0, 0.02, size=(256, 192))).astype(np.float32)  # raw residual units
    data = encode_map(amap)
    back = decode_map(data)
    assert _stored_dtype(data) == np.float16
    assert back.dtype == np.float32 and back.shape == amap.shape
    normal = amap >= np.finfo(np.float16).tiny  # below it float16 is subnormal: absolute error ≤ 2⁻²⁵
    np.testing.assert_allclose(back[normal], amap[normal], rtol=2.0**-11, atol=0)
    np.testing.assert_allclose(back[~normal], amap[~normal], rtol=0, atol=2.0**-25)
    assert len(data) < amap.nbytes * 0.51  # half of float32, plus the .npz header
    assert encode_map(back) == data  # storing what was read gives the same bytes


def test_a_map_float16_cannot_hold_is_stored_as_float32_unchanged() -> None:
    big = np.array([[0.0, 1.0e5]], dtype=np.float32)  # beyond float16's 65504
    with_nan = np.array([[0.0, np.nan]], dtype=np.float32)
    for amap in (big, with_nan):
        assert stored_map_dtype(amap) is np.float32
        data = encode_map(amap)
        assert _stored_dtype(data) == np.float32
        np.testing.assert_array_equal(decode_map(data), amap)
    assert stored_map_dtype(np.zeros((0, 0), dtype=np.float32)) is np.float16


def test_float32_maps_written_before_are_still_read() -> None:
    amap = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    buffer = io.BytesIO()
    np.savez(buffer, map=amap)  # the format of earlier versions
    np.testing.assert_array_equal(decode_map(buffer.getvalue()), amap)
