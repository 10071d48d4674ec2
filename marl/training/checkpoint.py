"""Checkpoints: ``<out>/checkpoints/update-<N>.pt`` plus ``latest.json`` naming the newest.

A checkpoint holds plain state dicts, tensors, numbers and one JSON string of metadata (``meta``:
format, scenario, algorithm and its config, protocol, channel, team layout), and is loaded with
``torch.load(weights_only=True)``, so loading never runs code from the file. :func:`load_checkpoint`
checks the metadata against the tensors before anything is built: a file that claims a
200,000-wide network, or whose tensors do not have the widths its metadata says, is refused with
one line instead of allocating memory.

Format 1 keys: model, optimizer, update, agreed_update, env_steps, episodes, world_size,
torch_rng, meta, optionally reward_scaler and value_norm. Added without a format change (older
files simply lack them): ``run_id`` (the training run that wrote it, so ``--resume`` can drop that
run's rows past the checkpoint) and ``episode`` (the training episode in progress, replayed on
``--resume``, :class:`marl.training.rollout.TrainingEpisode`).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from marl.core import registry
from marl.core.config import build_config, to_dict
from marl.core.errors import CheckpointError, ConcordError
from marl.results.io import atomic_write, atomic_write_json
from marl.results.records import now_iso
from marl.training.layout import TeamLayout

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "checked_config",
    "checkpoint_meta",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest.json"
CHECKPOINT_FORMAT = 1
_META_KEYS = ("scenario", "algo", "protocol", "channel", "algo_config", "layout")


def _shorten(text: str, width: int = 120) -> str:
    """The first line of ``text``, cut at a word boundary to at most ``width`` characters."""
    first = (text.splitlines() or [""])[0]
    return textwrap.shorten(first, width=width, placeholder=" ...") or first[:width]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file path, a checkpoints directory or a training output directory."""
    p = Path(path)
    if p.is_file():
        return p
    for directory in (p, p / CHECKPOINT_DIR):
        latest = directory / LATEST_FILE
        if latest.is_file():
            try:
                name = json.loads(latest.read_text())["file"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointError(f"corrupt checkpoint index {latest}; expected JSON with 'file'") from None
            target = directory / name
            if not target.is_file():
                raise CheckpointError(f"checkpoint {target} named by {latest} is missing")
            return target
    raise CheckpointError(
        f"no checkpoint at '{path}'; expected a .pt file, a checkpoints directory with {LATEST_FILE}, "
        "or a 'marl train' output directory"
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint; its ``meta`` JSON is decoded, ``path`` names the file."""
    file = resolve_checkpoint(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        meta = json.loads(state["meta"])
    except Exception as exc:
        raise CheckpointError(f"corrupt checkpoint {file}: {type(exc).__name__}: {_shorten(str(exc))}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {file} has format {found!r}; expected {CHECKPOINT_FORMAT}")
    state["meta"] = meta
    state["path"] = str(file)
    checked_config(state)
    return state


def checked_config(state: dict[str, Any]) -> Any:
    """The algorithm config of a loaded checkpoint, after checking the metadata's values and that
    the saved network really has the width the metadata claims (before anything is allocated)."""
    meta, file = state["meta"], state["path"]
    missing = [k for k in _META_KEYS if k not in meta]
    if missing or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"checkpoint {file} lacks {', '.join(missing) or 'model'}; not a 'marl train' checkpoint")
    try:
        algo_cls = registry.load(registry.algorithm_spec(meta["algo"]).entry_point)
        config = build_config(algo_cls.Config, meta["algo_config"], what="checkpoint algo_config key")
        layout = TeamLayout(**meta["layout"])
    except (ConcordError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {file} has bad metadata: {_shorten(str(exc))}") from None
    encoder = state["model"].get("encoder.net.0.weight")
    width = int(encoder.shape[-2]) if isinstance(encoder, torch.Tensor) and encoder.dim() >= 2 else None
    if width != config.hidden_size or not 0 < layout.n == len(layout.obs_sizes) == len(layout.action_sizes):
        raise CheckpointError(
            f"checkpoint {file} is inconsistent: metadata says hidden_size={config.hidden_size} and "
            f"{layout.n} agents, its encoder weight has width {width}"
        )
    return config


def save_checkpoint(
    directory: Path, update: int, state: dict[str, Any], keep: int, during_write: Callable[[], None] | None = None
) -> Path:
    """Write ``update-<N>.pt`` atomically, point ``latest.json`` at it, keep the newest ``keep``.

    ``during_write`` is called with the new file written to its temporary name, before the rename
    (tests aim a kill there: ``--inject-failure R:U:checkpoint``). A writer killed there leaves
    ``latest.json`` on the previous checkpoint and a ``.update-*.tmp`` file, which the next writer
    (the survivor that takes the writing over) removes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"update-{update:06d}.pt"

    def write(fh: Any) -> None:
        torch.save(state, fh)
        if during_write is not None:
            fh.flush()
            during_write()

    target = atomic_write(directory / name, write)
    for stale in directory.glob(".update-*.tmp"):  # left by a writer that died mid-write
        stale.unlink(missing_ok=True)
    atomic_write_json(
        directory / LATEST_FILE,
        {
            "file": name,
            "update": update,
            "env_steps": int(state["env_steps"]),
            "time": now_iso(),
        },
    )
    for old in sorted(directory.glob("update-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return target


def checkpoint_meta(request: Any, config: Any, layout: TeamLayout) -> dict[str, Any]:
    """The JSON metadata of every checkpoint of a run (``request``: its TrainRequest)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "scenario": request.scenario,
        "overrides": dict(request.overrides),
        "test": request.test,
        "algo": request.algo,
        "protocol": request.protocol,
        "channel": request.channel,
        "algo_config": to_dict(config),
        "layout": layout.to_meta(),
    }
