"""`ModelRegistry`: model versions in the object store.

Layout::

    models/<name>/<version>/weights.safetensors   # tensors only: no pickle, no code
    models/<name>/<version>/card.json             # ModelCard
    models/<name>/live                            # the live version (a pointer object)
    models/<name>/live-<line>                     # optional per-line pointer
"""

from __future__ import annotations

from datetime import UTC, datetime

from schemas import ModelCard
from trainer.store import ObjectMissing, ObjectStore


class ModelNotFound(LookupError):
    """No such model version, or no live version yet."""


def new_version_id(now: datetime | None = None) -> str:
    """A sortable version id like ``v20261129-223015-123456``."""
    now = now or datetime.now(UTC)
    return now.strftime("v%Y%m%d-%H%M%S-%f")


class ModelRegistry:
    """Save, load and point at model versions of one model name."""

    def __init__(self, store: ObjectStore, name: str) -> None:
        self.store = store
        self.name = name

    def _prefix(self, version: str) -> str:
        return f"models/{self.name}/{version}/"

    def save(self, card: ModelCard, weights: bytes) -> str:
        """Store a version's weights then its card (the card's presence marks it complete)."""
        if card.name != self.name:
            msg = f"card is for model {card.name!r}, registry is for {self.name!r}"
            raise ValueError(msg)
        prefix = self._prefix(card.version)
        self.store.put_bytes(prefix + "weights.safetensors", weights)
        self.store.put_bytes(prefix + "card.json", card.model_dump_json(indent=2).encode(), "application/json")
        return card.version

    def load_card(self, version: str) -> ModelCard:
        """The card of ``version``."""
        try:
            raw = self.store.get_bytes(self._prefix(version) + "card.json")
        except ObjectMissing as exc:
            msg = f"model {self.name!r} has no version {version!r}"
            raise ModelNotFound(msg) from exc
        return ModelCard.model_validate_json(raw)

    def load(self, version: str) -> tuple[ModelCard, bytes]:
        """The card and the safetensors bytes of ``version``."""
        card = self.load_card(version)
        weights = self.store.get_bytes(self._prefix(version) + "weights.safetensors")
        return card, weights

    def versions(self) -> list[str]:
        """Every complete version (with a card), oldest first."""
        found = []
        for key in self.store.list_keys(f"models/{self.name}/"):
            if key.endswith("/card.json"):
                found.append(key.split("/")[-2])
        return sorted(found)

    def _pointer_key(self, line: str | None) -> str:
        return f"models/{self.name}/live" if line in (None, "default") else f"models/{self.name}/live-{line}"

    def set_live(self, version: str, line: str | None = None) -> None:
        """Point the live pointer (of ``line``, or the default) at an existing version."""
        self.load_card(version)
        self.store.put_bytes(self._pointer_key(line), version.encode(), "text/plain")

    def live_version(self, line: str | None = None) -> str:
        """The live version of ``line``, falling back to the default pointer."""
        keys = (
            [self._pointer_key(line)]
            if line in (None, "default")
            else [
                self._pointer_key(line),
                self._pointer_key(None),
            ]
        )
        for key in keys:
            try:
                return self.store.get_bytes(key).decode().strip()
            except ObjectMissing:
                continue
        msg = f"model {self.name!r} has no live version yet; train one with `anomap train`"
        raise ModelNotFound(msg)
