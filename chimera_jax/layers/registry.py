"""Layer-pattern codes -> sequence mixers.

A model's ``pattern`` is a space-separated string of these codes, e.g. ``"GD XM GD TM GD XM GD A"``; it is
repeated to ``num_layers``. Each code names the module that implements the mixer and the config sub-block the
mixer reads, so a config only carries the sub-blocks its pattern uses. Modules are imported on first use.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    module: str            # python module that defines the mixer and its default_config()
    cls: str               # class name in that module
    block: str             # config sub-block the mixer reads (cfg.<block>)
    kwargs: tuple = ()     # fixed constructor arguments, as (name, value) pairs
    description: str = ""


MIXERS: dict[str, MixerSpec] = {
    "A": MixerSpec("chimera_jax.layers.attention", "Attention", "attention", (("window", 0),),
                   "full causal attention (MHA/GQA/MQA, RoPE or ALiBi)"),
    "SW": MixerSpec("chimera_jax.layers.attention", "Attention", "attention", (),
                    "sliding-window attention of width model.attention.window (ring-buffer cache)"),
    "M1": MixerSpec("chimera_jax.layers.mamba", "Mamba", "mamba", (), "Mamba-1 selective SSM"),
    "M2": MixerSpec("chimera_jax.layers.mamba2", "Mamba2", "mamba2", (), "Mamba-2 / SSD"),
    "RG": MixerSpec("chimera_jax.layers.griffin", "GriffinRecurrent", "griffin", (), "Griffin RG-LRU block"),
    "GD": MixerSpec("chimera_jax.layers.gated_deltanet", "GatedDeltaNet", "gdn", (), "Gated DeltaNet"),
    "XM": MixerSpec("chimera_jax.layers.mlstm", "MLSTM", "mlstm", (), "xLSTM mLSTM"),
    "TM": MixerSpec("chimera_jax.layers.titans", "TitansMAC", "titans", (), "Titans neural memory (MAC)"),
    "H": MixerSpec("chimera_jax.layers.hassm", "HASSM", "hassm", (),
                   "HASSM: selective SSM + ALiBi attention in parallel, gated"),
    "CH": MixerSpec("chimera_jax.layers.chimera", "Chimera", "chimera", (),
                    "CHIMERA: per-token router over Mamba-2, sliding-window, full attention and identity"),
}


def parse_pattern(pattern: str, num_layers: int) -> list[str]:
    """'GD XM GD A' with num_layers=8 -> the 8 codes, the pattern repeated; unknown codes are refused."""
    codes = pattern.split()
    if not codes:
        raise ValueError("model.pattern is empty; give layer codes such as 'A' or 'RG RG RG SW'")
    unknown = [c for c in codes if c not in MIXERS]
    if unknown:
        raise ValueError(f"model.pattern has unknown layer codes {unknown}; valid codes: {sorted(MIXERS)}")
    if num_layers % len(codes):
        raise ValueError(f"model.num_layers={num_layers} is not a multiple of the pattern length {len(codes)} "
                         f"(model.pattern={pattern!r})")
    return codes * (num_layers // len(codes))


def default_block_config(block: str) -> ml_collections.ConfigDict:
    """The default config sub-block of a mixer family (its module's default_config())."""
    spec = next(s for s in MIXERS.values() if s.block == block)
    return importlib.import_module(spec.module).default_config()


_AUTO = object()


def build_mixer(code: str, cfg: ml_collections.FrozenConfigDict, name: str | None, parent: Any = _AUTO) -> Any:
    """The mixer of ``code``; ``parent=None`` builds a detached module (for ``init_cache`` outside a model)."""
    spec = MIXERS[code]
    if spec.block not in cfg:
        raise ValueError(f"layer code {code!r} needs the config sub-block model.{spec.block}")
    cls = getattr(importlib.import_module(spec.module), spec.cls)
    kwargs = dict(spec.kwargs)
    if code == "SW" and not cfg.attention.window:
        raise ValueError("layer code 'SW' needs model.attention.window > 0")
    if parent is not _AUTO:
        kwargs["parent"] = parent
    return cls(cfg, name=name, **kwargs)


FFNS = {"moe": "chimera_jax.layers.moe"}


def default_ffn_config(kind: str) -> ml_collections.ConfigDict:
    return importlib.import_module(FFNS[kind]).default_config()
