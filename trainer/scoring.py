"""Score patches and whole images with a trained model version: anomaly maps of the card's `MapMode`.

``residual`` is |x − G(E(x))|; ``residual+logit`` multiplies it by −log D(x) of a dense (per 8×8 cell)
discriminator, which γ < 1 has trained to call the confirmed defects fake; see `schemas.model_card.MapMode`.

Images and patches are float32 in [0, 1] outside this module; the networks see [-1, 1] inside it (or
(patch − its mean)·gain with a `TrainConfig.contrast_gain`), and residuals come back in [0, 1] intensity
units (0.05 = 5 % of full scale).

Example (1024×1024 image, P = 64, S = 32 -> 1024 patches)::

    model = PatchModel.from_safetensors(card, weights_bytes)       # card: schemas.ModelCard
    maps = model.score_patches(patches)                              # (N, 64, 64) -> (N, 64, 64), >= 0
    amap = anomaly_map(image, model, batch_size=256)                 # (1024, 1024) float32, smoothed

`anomaly_map` tiles, scores and stitches in this process; the serving layer splits the same patches
across replicas and calls `score_patches` and `finish_map` itself.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from schemas import ModelCard, ScoreMode
from schemas.model_card import MapMode
from trainer.model_io import sub_state, weights_from_bytes
from trainer.networks import Discriminator, DiscriminatorHead, Encoder, Generator
from trainer.patches import as_unit_float
from trainer.tiling import extract_patches, plan_tiles, stitch_patches

_NEEDS_DISCRIMINATOR = frozenset({MapMode.FEATURE, MapMode.LOGIT, MapMode.RESIDUAL_LOGIT})


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, round(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()  # (2r + 1,)


def _smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, P, P), reflect-padded: (B, 1, P, P)."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma).to(x)
    r = (len(k) - 1) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def _upsample(cells: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, h, w) per-cell scores -> (B, 1, P, P), bilinear (cell centres stay at cell centres)."""
    return F.interpolate(cells, size=(size, size), mode="bilinear", align_corners=False)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class PatchModel:
    """A model version ready to score P×P patches (encoder mode, method.md §4)."""

    def __init__(
        self,
        card: ModelCard,
        generator: Generator,
        encoder: Encoder,
        discriminator: Discriminator | None = None,
        device: str | None = None,
    ) -> None:
        if card.score_mode == ScoreMode.SEARCH:
            msg = "score mode 'search' (latent search, method.md §4) is not implemented yet; use 'encoder'"
            raise ValueError(msg)
        if card.score_mode != ScoreMode.ENCODER:
            msg = f"unknown score mode {card.score_mode!r}"
            raise ValueError(msg)
        if card.map_mode in _NEEDS_DISCRIMINATOR and discriminator is None:
            msg = f"map mode {card.map_mode!r} needs the discriminator; build with from_state/from_safetensors"
            raise ValueError(msg)
        self._card = card
        self.device = torch.device(device or default_device())
        self.generator = generator.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()
        self.discriminator = discriminator.to(self.device).eval() if discriminator is not None else None
        self.amp = self.device.type == "cuda"

    @classmethod
    def from_state(
        cls,
        card: ModelCard,
        state: dict[str, torch.Tensor],
        device: str | None = None,
        with_discriminator: bool = False,
    ) -> PatchModel:
        """Build from a flat ``generator.… / encoder.… / discriminator.…`` state dict and the card's architecture."""
        p, z, c = card.patch_size, card.latent_dim, card.base_channels
        generator, encoder = Generator(p, z, c), Encoder(p, z, c)
        try:
            generator.load_state_dict(sub_state(state, "generator"))
            encoder.load_state_dict(sub_state(state, "encoder"))
            discriminator = None
            if with_discriminator or card.map_mode in _NEEDS_DISCRIMINATOR:
                head = DiscriminatorHead(card.train_config.get("discriminator_head", DiscriminatorHead.GLOBAL))
                discriminator = Discriminator(p, c, card.spectral_norm, head)
                discriminator.load_state_dict(sub_state(state, "discriminator"))
        except (KeyError, RuntimeError) as exc:
            msg = f"weights do not match model card {card.name}/{card.version} (P={p}, Z={z}, base={c}): {exc}"
            raise ValueError(msg) from exc
        return cls(card, generator, encoder, discriminator, device)

    @classmethod
    def from_safetensors(
        cls, card: ModelCard, weights: bytes, device: str | None = None, with_discriminator: bool = False
    ) -> PatchModel:
        """Build from the registry's card and ``weights.safetensors`` bytes."""
        return cls.from_state(card, weights_from_bytes(weights), device, with_discriminator)

    @property
    def card(self) -> ModelCard:
        """The model card of this version."""
        return self._card

    @property
    def patch_size(self) -> int:
        return self._card.patch_size

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    @torch.inference_mode()
    def reconstruct(self, patches: np.ndarray) -> np.ndarray:
        """G(E(x)) for patches (N, P, P) in [0, 1] -> (N, P, P) float32 in [0, 1]."""
        x = self._to_tensor(patches)
        with self._autocast():
            rec = self.generator(self.encoder(x)).float()  # (N, 1, P, P), network units
        if self.contrast_gain > 0:
            mean = torch.from_numpy(np.asarray(patches, dtype=np.float32)).to(self.device).mean((1, 2))
            return (rec.squeeze(1) / self.contrast_gain + mean[:, None, None]).cpu().numpy()
        return ((rec + 1.0) / 2.0).squeeze(1).cpu().numpy()

    @torch.inference_mode()
    def score_patches(self, patches: np.ndarray) -> np.ndarray:
        """The card's pixel map (`MapMode`) of patches (N, P, P) in [0, 1] -> (N, P, P) float32 >= 0, one batch."""
        x = self._to_tensor(patches)
        with self._autocast():
            maps = self._maps(x)
        return maps.float().squeeze(1).cpu().numpy()

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, P, P) in [-1, 1] -> (N, 1, P, P) map of the card's mode."""
        mode, p = self._card.map_mode, self.patch_size
        rec = self.generator(self.encoder(x))  # (N, 1, P, P)
        residual = (x - rec.float()) / self._units  # signed, [0, 1] intensity units
        if mode == MapMode.RESIDUAL:
            return residual.abs()
        if mode == MapMode.SMOOTH_RESIDUAL:
            return _smooth(residual, self._card.smoothing_sigma).abs()
        d = self.discriminator
        assert d is not None  # checked in __init__
        if mode == MapMode.FEATURE:
            both = d.feature_map(torch.cat([x, rec]))  # (2N, C, P/4, P/4)
            f_x, f_rec = both.float().chunk(2)
            return _upsample((f_x - f_rec).abs().mean(1, keepdim=True), p)
        fake = _upsample(F.softplus(-d.logit_map(x).float()), p)  # −log D(x) per pixel, >= 0
        if mode == MapMode.LOGIT:
            return fake
        return residual.abs() * fake  # RESIDUAL_LOGIT

    @property
    def contrast_gain(self) -> float:
        """The card's `TrainConfig.contrast_gain` (0 for versions trained before it existed)."""
        return float(self._card.train_config.get("contrast_gain") or 0.0)

    @property
    def _units(self) -> float:
        """Network units per [0, 1] intensity unit."""
        return self.contrast_gain if self.contrast_gain > 0 else 2.0

    def _to_tensor(self, patches: np.ndarray) -> torch.Tensor:
        p = self.patch_size
        if patches.ndim != 3 or patches.shape[1:] != (p, p):
            msg = f"expected patches of shape (N, {p}, {p}), got {patches.shape}"
            raise ValueError(msg)
        array = np.ascontiguousarray(patches, dtype=np.float32)
        if not array.flags.writeable:  # e.g. zero-copy from the Ray object store
            array = array.copy()
        x = torch.from_numpy(array).to(self.device).unsqueeze(1)  # (N, 1, P, P)
        if self.contrast_gain > 0:
            return (x - x.mean(dim=(2, 3), keepdim=True)) * self.contrast_gain
        return x * 2.0 - 1.0  # [-1, 1]


def finish_map(stitched: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth a stitched (H, W) residual map (σ in pixels; 0 = unchanged) -> (H, W) float32."""
    if stitched.ndim != 2:
        msg = f"expected a stitched (H, W) map, got shape {stitched.shape}"
        raise ValueError(msg)
    if sigma < 0:
        msg = f"smoothing sigma must be >= 0, got {sigma}"
        raise ValueError(msg)
    out = np.asarray(stitched, dtype=np.float32)
    if sigma == 0:
        return out.copy()
    return gaussian_filter(out, sigma=sigma, mode="reflect").astype(np.float32, copy=False)


def anomaly_map(image: np.ndarray, model: PatchModel, batch_size: int = 256) -> np.ndarray:
    """The smoothed anomaly map of one (H, W) image in [0, 1] (uint8 accepted) -> (H, W) float32 >= 0.

    Tiles with the card's patch size and stride (reflect padding at the borders), scores in batches of
    ``batch_size`` patches, stitches with a window-weighted mean, then smooths with ``card.smoothing_sigma``.
    """
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}"
        raise ValueError(msg)
    unit = as_unit_float(image)
    card = model.card
    layout = plan_tiles(unit.shape[0], unit.shape[1], card.patch_size, card.stride)
    patches = extract_patches(unit, layout)  # (N, P, P)
    maps = np.concatenate(
        [model.score_patches(patches[i : i + batch_size]) for i in range(0, len(patches), batch_size)]
    )
    return finish_map(stitch_patches(maps, layout), card.smoothing_sigma)
