"""Weights to bytes and back: safetensors, tensors only, no pickle."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from trainer.model_io import sub_state, weights_from_bytes, weights_to_bytes
from trainer.networks import build_networks


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    g, d, e = build_networks(32, 8, 4)
    out = {}
    for prefix, net in (("generator", g), ("discriminator", d), ("encoder", e)):
        out |= {f"{prefix}.{k}": v for k, v in net.state_dict().items()}
    return out


def test_round_trip_keeps_every_tensor_exactly() -> None:
    state = _state()
    back = weights_from_bytes(weights_to_bytes(state))
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_bytes_are_safetensors_not_pickle() -> None:
    state = _state()
    data = weights_to_bytes(state)
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 length, then a JSON header
    header = json.loads(data[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(state)
    assert all(
        {"dtype", "shape", "data_offsets"} <= set(entry) for key, entry in header.items() if key != "__metadata__"
    )
    with pytest.raises((pickle.UnpicklingError, ValueError)):
        pickle.loads(data)  # proving it is *not* a pickle


def test_round_trip_loads_into_fresh_networks() -> None:
    back = weights_from_bytes(weights_to_bytes(_state()))
    g, d, e = build_networks(32, 8, 4)
    g.load_state_dict(sub_state(back, "generator"))
    d.load_state_dict(sub_state(back, "discriminator"))
    e.load_state_dict(sub_state(back, "encoder"))


def test_non_tensor_values_are_refused() -> None:
    with pytest.raises(TypeError, match="tensors only"):
        weights_to_bytes({"step": 3})  # type: ignore[dict-item]


def test_garbage_bytes_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not valid safetensors"):
        weights_from_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(ValueError, match="empty"):
        weights_from_bytes(b"")


def test_missing_prefix_names_what_is_there() -> None:
    with pytest.raises(KeyError, match="generator"):
        sub_state({"encoder.w": torch.zeros(1)}, "generator")
