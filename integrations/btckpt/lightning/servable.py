"""The servable form of a Lightning checkpoint whose LightningModule holds a ``transformers`` model.

Used by :mod:`btckpt.lightning`: the HF model's weights are stored under the HF model's own keys (the
LightningModule's attribute prefix, e.g. ``model.``, stripped) and its ``config.json`` /
``generation_config.json`` go into the same commit, so ``from_pretrained(folder)`` loads the folder. The
manifest's ``meta["lightning"]["hf"]`` records the prefix and the keys left as they were, so a resume
gets the LightningModule's exact ``state_dict`` keys back. ``transformers`` is never imported here: a
PreTrainedModel can only exist once the user imported it.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Mapping
from typing import Any

from ..adapters import model_config_files
from ..errors import ConfigError, CorruptCheckpoint

__all__ = ["HFLayout", "from_hf_keys"]

log = logging.getLogger("btckpt")


def _pretrained_class() -> Any:
    mod = sys.modules.get("transformers")
    if mod is None:
        return None
    from transformers import PreTrainedModel  # only once the user imported it (module doc): never a hard dep

    return PreTrainedModel


class HFLayout:
    """Finds the HF model of the attached LightningModule and re-keys ``state_dict`` for it.

    ``choice``: True (find the one ``PreTrainedModel`` submodule; several: none, with a warning), a dotted
    attribute path of the LightningModule (e.g. ``"model"``), or False (off).
    """

    def __init__(self, choice: str | bool) -> None:
        if not isinstance(choice, (str, bool)) or choice == "":
            raise ConfigError(f"hf_model={choice!r}: pass True (detect), False (off) or the LightningModule's "
                              "attribute holding the transformers model, e.g. hf_model='model'")
        self.choice = choice
        self._module: weakref.ReferenceType[Any] | None = None
        self._warned: set[str] = set()

    def attach(self, module: Any) -> None:
        """Remember (weakly) the LightningModule whose saves are re-keyed."""
        self._module = weakref.ref(module) if module is not None else None

    def _warn(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(msg, *args)

    def find(self) -> tuple[str, Any] | None:
        """(attribute path, PreTrainedModel) of the attached LightningModule, or None."""
        if self.choice is False:
            return None
        module = self._module() if self._module is not None else None
        if module is None:
            if isinstance(self.choice, str):
                self._warn("unattached", "btckpt: hf_model=%r needs btckpt.lightning.ModelCheckpoint among the "
                           "callbacks (it tells the plugin the LightningModule); saving the LightningModule's "
                           "own keys and no config.json", self.choice)
            return None
        pretrained = _pretrained_class()
        if isinstance(self.choice, str):
            try:
                target = module.get_submodule(self.choice)
            except AttributeError:
                raise ConfigError(f"hf_model={self.choice!r}: {type(module).__name__} has no such submodule") \
                    from None
            if pretrained is None or not isinstance(target, pretrained):
                raise ConfigError(f"hf_model={self.choice!r} is a {type(target).__name__}, not a "
                                  "transformers PreTrainedModel")
            return self.choice, target
        if pretrained is None:
            return None
        found: list[tuple[str, Any]] = []
        for name, sub in module.named_modules():
            if name and isinstance(sub, pretrained) and not any(name.startswith(f + ".") for f, _ in found):
                found.append((name, sub))
        if len(found) > 1:
            self._warn("several", "btckpt: %s holds several transformers models (%s); checkpoints keep the "
                       "LightningModule's keys and get no config.json. Choose one with "
                       "SafetensorsCheckpointIO(hf_model=...)", type(module).__name__,
                       ", ".join(n for n, _ in found))
            return None
        return found[0] if found else None

    def prepare(self, state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, bytes], dict[str, Any]] | None:
        """(state_dict under HF keys, config files, meta recording the mapping), or None (nothing to do)."""
        hit = self.find()
        if hit is None:
            return None
        attr, model = hit
        prefix = attr + "."
        missing = [k for k in model.state_dict() if prefix + k not in state_dict]
        if missing:
            self._warn("missing", "btckpt: the checkpoint's state_dict lacks %d of %s's keys (e.g. %r; renamed "
                       "by the strategy?); saving the LightningModule's own keys and no config.json",
                       len(missing), attr, prefix + missing[0])
            return None
        out: dict[str, Any] = {}
        kept: list[str] = []
        for key, value in state_dict.items():
            if not isinstance(key, str):
                return None
            new = key[len(prefix):] if key.startswith(prefix) else key
            if new in out:
                raise ConfigError(f"cannot store the state_dict under {attr}'s HF keys: {key!r} and "
                                  f"{(prefix + new) if new == key else new!r} would both be {new!r}. Rename the "
                                  "LightningModule's attribute, or pass SafetensorsCheckpointIO(hf_model=False)")
            if new == key:
                kept.append(key)
            out[new] = value
        meta = {"attribute": attr, "prefix": prefix, "unprefixed": kept, "class": type(model).__name__}
        return out, model_config_files(model), meta


def from_hf_keys(state_dict: Any, meta: Any, *, where: str) -> Any:
    """The LightningModule's ``state_dict`` back from a folder saved under HF keys (``meta`` from the manifest)."""
    if not isinstance(state_dict, dict):
        return state_dict
    prefix = meta.get("prefix") if isinstance(meta, dict) else None
    kept = meta.get("unprefixed") if isinstance(meta, dict) else None
    if not isinstance(prefix, str) or not isinstance(kept, list) or not all(isinstance(k, str) for k in kept):
        raise CorruptCheckpoint(f"{where}: manifest meta lightning.hf must hold 'prefix' (str) and "
                                "'unprefixed' (list of str)")
    keep = set(kept)
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key if key in keep else prefix + key
        if new in out:
            raise CorruptCheckpoint(f"{where}: state_dict key {new!r} twice after restoring the HF prefix")
        out[new] = value
    return out
