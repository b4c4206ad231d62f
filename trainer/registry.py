"""`ModelRegistry`: model versions in the object store.

Layout::

    models/<name>/<version>/weights.safetensors   # tensors only: no pickle, no code
    models/<name>/<version>/card.json             # ModelCard
    models/<name>/live                            # the live version (a pointer object)
    models/<name>/live-<line>                     # optional per-line pointer
    models/<name>/live-history.json               # every move of the default pointer (ModelEvent list)
    models/<name>/live-history-<line>.json        # ... of a line's pointer

A line without a pointer of its own follows the default one. Every move of a pointer (`promote`,
`set_live`, `rollback`) is appended to its history, and `rollback` walks back through it::

    registry.promote("v2", line="press-2", reason="retrained")   # press-2: v1 -> v2
    registry.rollback("press-2")                                 # press-2: v2 -> v1
    registry.rollback("press-2")                                 # press-2 follows the default again

Every version the registry saves or promotes has been checked to serve (`check_servable`): its weights
load into its card's architecture on a CPU and score a small patch batch to finite maps. A version that
could not would fail on every scorer it reaches, and promoted on the default line it would stop every
line. A card is only read back under its own name and version (`load_card`), so a version folder copied
under another name is refused rather than scored as the version it is not.

History keys end in ``.json`` and line ids hold no dots, so no line's pointer can collide with them.
The history is read, extended and written back without a lock: two people moving the same pointer at
the same moment can lose one history entry (the pointer itself is always whatever was written last).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import numpy as np
from pydantic import TypeAdapter

from schemas import LINE_PATTERN, ModelCard, ModelEvent, ModelEventKind
from schemas.ids import MODEL_VERSION_PATTERN
from trainer.store import ObjectMissing, ObjectStore

MAX_HISTORY = 1000
"""Events kept per pointer history (the oldest are dropped)."""
CHECK_PATCHES = 2
"""Patches in the batch `check_servable` scores."""
_EVENTS = TypeAdapter(list[ModelEvent])


class ModelNotFound(LookupError):
    """No such model version, or no live version yet."""


class NothingToRollBack(LookupError):
    """A pointer's history holds no earlier version to go back to."""


def check_patches(patch_size: int, n: int = CHECK_PATCHES) -> np.ndarray:
    """``n`` fixed (P, P) float32 patches in [0, 1] for `check_servable`: a diagonal ramp, then flat grey.

    Returns (n, P, P).
    """
    ramp = np.add.outer(np.arange(patch_size), np.arange(patch_size)) / max(2 * (patch_size - 1), 1)
    patches = np.full((n, patch_size, patch_size), 0.5, dtype=np.float32)
    patches[0] = ramp
    return patches


def servable_problem(card: ModelCard, weights: bytes) -> str | None:
    """Why ``weights`` (safetensors bytes) cannot serve ``card`` (None when they can).

    They must parse, hold only finite tensors, load into the card's architecture (`PatchModel.from_safetensors`
    on the CPU, with the discriminator where the card's map or score mode needs it) and score `check_patches`
    to finite maps of shape (n, P, P). A search (score mode ``search``, or ``refine_steps``) runs one step, not
    the card's Γ: it is the weights that are checked, not the search.
    """
    import torch  # here, not at the top: listing or pointing at versions needs no torch

    from trainer.model_io import weights_from_bytes
    from trainer.scoring import LatentOptions, PatchModel

    try:
        state = weights_from_bytes(weights)
        latent = LatentOptions.for_card(card)
    except ValueError as exc:
        return str(exc)
    bad = sorted(key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all())
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return f"weights hold NaN or infinite values in {shown}"
    steps = min(latent.steps, 1)
    try:
        model = PatchModel.from_state(card, state, device="cpu", search_steps=steps, refine_steps=steps)
        patches = check_patches(card.patch_size)
        maps = model.score_patches(patches)
    except (ValueError, KeyError, RuntimeError) as exc:  # from_state names a mismatch; torch raises RuntimeError
        return f"weights do not load into the card's architecture or score with it: {exc}"
    if maps.shape != patches.shape:
        return f"scoring {patches.shape} patches gave maps of shape {maps.shape}"
    if not np.isfinite(maps).all():
        return f"scoring {len(patches)} test patches gave NaN or infinite maps"
    return None


def check_servable(card: ModelCard, weights: bytes) -> None:
    """Raise ValueError naming the version and the problem unless ``weights`` serve ``card`` (`servable_problem`)."""
    problem = servable_problem(card, weights)
    if problem:
        msg = f"model {card.name}/{card.version} cannot be served: {problem}"
        raise ValueError(msg)


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
        if not re.fullmatch(MODEL_VERSION_PATTERN, version):  # e.g. "", "a/b" or "../x" would read other keys
            msg = f"model version {version!r} is not a version name (letters, digits, '-', '_'; at most 64)"
            raise ValueError(msg)
        return f"models/{self.name}/{version}/"

    def save(self, card: ModelCard, weights: bytes) -> str:
        """Store a version's weights then its card (the card's presence marks it complete).

        Raises ValueError, storing nothing, if the card is another model's or the weights cannot serve it
        (`check_servable`).
        """
        if card.name != self.name:
            msg = f"card is for model {card.name!r}, registry is for {self.name!r}"
            raise ValueError(msg)
        prefix = self._prefix(card.version)
        check_servable(card, weights)
        self.store.put_bytes(prefix + "weights.safetensors", weights)
        self.store.put_bytes(prefix + "card.json", card.model_dump_json(indent=2).encode(), "application/json")
        return card.version

    def update_card(self, card: ModelCard) -> None:
        """Rewrite the card of an existing version, its weights untouched (e.g. to record how it was judged).

        Raises `ModelNotFound` if the version does not exist, ValueError if the card is another model's.
        """
        if card.name != self.name:
            msg = f"card is for model {card.name!r}, registry is for {self.name!r}"
            raise ValueError(msg)
        self.load_card(card.version)
        key = self._prefix(card.version) + "card.json"
        self.store.put_bytes(key, card.model_dump_json(indent=2).encode(), "application/json")

    def load_card(self, version: str) -> ModelCard:
        """The card of ``version``.

        Raises `ModelNotFound` if there is none, ValueError if the card stored there names another version or
        model (a version folder copied under another name: its results would name a version that did not
        score them).
        """
        key = self._prefix(version) + "card.json"
        try:
            raw = self.store.get_bytes(key)
        except ObjectMissing as exc:
            msg = f"model {self.name!r} has no version {version!r}"
            raise ModelNotFound(msg) from exc
        card = ModelCard.model_validate_json(raw)
        if (card.name, card.version) != (self.name, version):
            msg = f"{key} holds the card of {card.name}/{card.version}, not of {self.name}/{version}"
            raise ValueError(msg)
        return card

    def load(self, version: str) -> tuple[ModelCard, bytes]:
        """The card and the safetensors bytes of ``version`` (the card checked as in `load_card`)."""
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

    def _history_key(self, line: str | None) -> str:
        base = f"models/{self.name}/live-history"
        return f"{base}.json" if line in (None, "default") else f"{base}-{line}.json"

    def set_live(self, version: str, line: str | None = None) -> None:
        """Point the live pointer (of ``line``, or the default) at an existing version (see `promote`)."""
        self.promote(version, line, reason="set_live")

    def own_version(self, line: str | None = None) -> str | None:
        """The version the pointer of ``line`` itself names (None: it has none, so follows the default)."""
        try:
            return self.store.get_bytes(self._pointer_key(line)).decode().strip()
        except ObjectMissing:
            return None

    def live_pointers(self) -> dict[str, str]:
        """Every pointer that exists: ``{"default": version, "<line>": version, ...}``."""
        pointers: dict[str, str] = {}
        prefix = f"models/{self.name}/"
        for key in self.store.list_keys(prefix, recursive=False):
            leaf = key[len(prefix) :]
            if leaf == "live":
                line = "default"
            elif leaf.startswith("live-") and re.fullmatch(LINE_PATTERN, leaf[len("live-") :]):
                line = leaf[len("live-") :]
            else:
                continue
            version = self.own_version(line)
            if version is not None:
                pointers[line] = version
        return pointers

    def history(self, line: str | None = None) -> list[ModelEvent]:
        """Every recorded move of the pointer of ``line`` (default: the default pointer), oldest first."""
        try:
            raw = self.store.get_bytes(self._history_key(line))
        except ObjectMissing:
            return []
        return _EVENTS.validate_json(raw)

    def _record(self, event: ModelEvent) -> None:
        events = [*self.history(event.line), event][-MAX_HISTORY:]
        body = json.dumps([e.model_dump(mode="json") for e in events], indent=1).encode()
        self.store.put_bytes(self._history_key(event.line), body, "application/json")

    def _point(self, line: str, version: str | None) -> None:
        if version is None:
            self.store.delete(self._pointer_key(line))
        else:
            self.store.put_bytes(self._pointer_key(line), version.encode(), "text/plain")

    def promote(self, version: str, line: str | None = None, reason: str = "") -> ModelEvent:
        """Make ``version`` live on ``line`` (default: the default pointer) and record the move.

        Raises `ModelNotFound` if the version does not exist, ValueError (the pointer unmoved) if it cannot
        be served (`check_servable`: versions saved before `save` checked). Promoting the version the
        pointer already names changes and records nothing (the event's ``changed`` is False).
        """
        self.load_card(version)
        line = line or "default"
        previous = self.own_version(line)
        event = ModelEvent(
            event=ModelEventKind.PROMOTE, name=self.name, line=line, version=version, previous=previous, reason=reason
        )
        if event.changed:
            check_servable(*self.load(version))
            self._point(line, version)  # the pointer first: it is what serves; history follows it
            self._record(event)
        return event

    def _stack(self, line: str) -> list[str | None]:
        """What the pointer named over time, as a stack that rollbacks pop (None: no pointer of its own)."""
        stack: list[str | None] = []
        for event in self.history(line):
            if event.event is ModelEventKind.PROMOTE:
                if not stack or stack[-1] != event.previous:  # it was moved outside the history
                    stack.append(event.previous)
                stack.append(event.version)
            else:
                if stack and stack[-1] == event.previous:
                    stack.pop()
                if not stack or stack[-1] != event.version:
                    stack.append(event.version)
        current = self.own_version(line)
        if not stack or stack[-1] != current:
            stack.append(current)
        return stack

    def rollback(self, line: str | None = None, reason: str = "") -> ModelEvent:
        """Point ``line`` back at the version that was live before the current one; record the move.

        For a line other than the default, "before" may be "no pointer of its own": the pointer is
        removed and the line follows the default model again. Raises `NothingToRollBack` when the
        history holds no earlier version.
        """
        line = line or "default"
        stack = self._stack(line)
        current = stack[-1]
        target = stack[-2] if len(stack) >= 2 else None
        if len(stack) < 2 or (target is None and line == "default"):
            where = "the default line" if line == "default" else f"line {line!r}"
            if current is not None:
                now = f"{current} is the first live version recorded"
            else:
                now = "no version is live" if line == "default" else "it follows the default line's model"
            msg = f"nothing to roll back to on {where} of model {self.name!r}: {now}"
            raise NothingToRollBack(msg)
        if target is not None:
            self.load_card(target)
        event = ModelEvent(
            event=ModelEventKind.ROLLBACK, name=self.name, line=line, version=target, previous=current, reason=reason
        )
        self._point(line, target)
        self._record(event)
        return event

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
