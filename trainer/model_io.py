"""Model weights <-> bytes with safetensors: tensors only, no pickle, no code.

Example::

    data = weights_to_bytes({"generator.project.0.weight": w, ...})   # bytes for the registry
    state = weights_from_bytes(data)                                  # {"generator....": Tensor}
    generator.load_state_dict(sub_state(state, "generator"))
"""

from __future__ import annotations

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

NETWORK_PREFIXES = ("generator", "discriminator", "encoder")


def weights_to_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a flat ``{name: tensor}`` dict (CPU copies, contiguous, no shared storage) to safetensors."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            msg = f"weights must be tensors only; {key!r} is a {type(value).__name__}"
            raise TypeError(msg)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    return _st_save(tensors, metadata=metadata)


def weights_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes back into ``{name: tensor}`` (on CPU)."""
    if not data:
        msg = "weights are empty (expected safetensors bytes)"
        raise ValueError(msg)
    try:
        return _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError for malformed headers
        msg = f"weights are not valid safetensors data ({len(data)} bytes): {exc}"
        raise ValueError(msg) from exc


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"a.b": t}`` -> ``{"prefix.a.b": t}``."""
    return {f"{prefix}.{key}": value for key, value in state.items()}


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.``, with the prefix removed; an error if there are none."""
    head = prefix + "."
    out = {key[len(head) :]: value for key, value in state.items() if key.startswith(head)}
    if not out:
        prefixes = sorted({key.split(".", 1)[0] for key in state})
        msg = f"weights have no {prefix!r} entries; prefixes present: {prefixes}"
        raise KeyError(msg)
    return out
