"""The state of a generation at a resume point, saved as one safetensors file (no pickle).

A run can be continued bit for bit from a stage boundary of the chunk plan (after a chunk turns
clean): what it needs then is small and explicit (``magi.sampling.denoise``'s ``start_step``):

* the in-flight chunks' latents (the window, the just-finished chunk included: its K/V refresh
  is the next step) and the next step's index;
* the prefix latents (i2v image / v2v clip); the prefix K/V call is redone on resume;
* the request: mode, seed and noise kind, the frame budget, the per-chunk prompts with their T5
  features (resume needs no T5), the special-token switches, the sampler settings;
* identity: magi version, compat mode, a hash of the config and of the checkpoint's weight
  index, so a state is never resumed on another model;
* progress: chunks and frames already written.

The file holds the tensors and, in its metadata, the JSON description plus a sha256 over both,
so a truncated or edited file is refused. It is written to a temporary file in the same folder,
fsynced, and renamed.

Legend: C latent channels, cw chunk width (latent frames), H W latent size, Lcap caption slots,
Ccap caption width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from magi.request import shown_path
from magi.version import __version__

FORMAT = "magi-generation-state/1"


class StateError(ValueError):
    """A state file that cannot be used here (damaged, edited, or from another model / version)."""


@dataclass
class GenerationState:
    """Everything needed to continue a run at a resume point (see the module docstring).

    Attributes:
        meta: JSON-able description (request, plan position, identity, progress).
        window: chunk -> [1, C, cw, H, W] float32 in-flight latents.
        prefix: [1, C, P, H, W] prefix latents, or None (t2v).
        prompt_emb, prompt_mask: [Pn, Lcap, Ccap] / [Pn, Lcap] T5 features of the distinct prompts.
    """

    meta: dict
    window: dict[int, torch.Tensor]
    prefix: torch.Tensor | None
    prompt_emb: torch.Tensor
    prompt_mask: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def next_step(self) -> int:
        return int(self.meta["next_step"])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"window.{c}": t.contiguous() for c, t in self.window.items()}
        out["prompt_emb"], out["prompt_mask"] = self.prompt_emb.contiguous(), self.prompt_mask.contiguous()
        if self.prefix is not None:
            out["prefix"] = self.prefix.contiguous()
        out.update({f"extra.{k}": v.contiguous() for k, v in self.extra.items()})
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, fsync, rename); returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = self.tensors()
        text = json.dumps(self.meta, sort_keys=True)
        metadata = {"format": FORMAT, "meta": text, "sha256": _digest(text, tensors)}
        tmp = path.parent / f".{path.name[:200]}.magi-partial-{os.getpid()}"
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as err:  # OSError, or safetensors' own error for a full disk
            tmp.unlink(missing_ok=True)
            raise OSError(f"cannot write the generation state {shown_path(path)}: {err}".splitlines()[0]) from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> GenerationState:
        """Read and verify a state file.

        Raises:
            StateError: one line naming the file and what is wrong with it.
        """
        from safetensors import safe_open

        path = Path(path)
        shown = shown_path(path)  # messages stay one line of <= 200 characters (magi.request)
        if not path.is_file():
            raise StateError(f"generation state {shown} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # truncated / not safetensors
            raise StateError(
                f"generation state {shown} is damaged or not a state file "
                f"({str(err).splitlines()[0][:80] if str(err) else type(err).__name__})"
            ) from None
        if metadata.get("format") != FORMAT:
            raise StateError(f"{shown} is not a magi generation state (format {metadata.get('format')!r})"[:200])
        text = metadata.get("meta", "")
        if _digest(text, tensors) != metadata.get("sha256"):
            raise StateError(f"generation state {shown} fails its checksum: it was edited or damaged")
        meta = json.loads(text)
        window = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("window.")}
        extra = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(meta, window, tensors.get("prefix"), tensors["prompt_emb"], tensors["prompt_mask"], extra)

    def check_compatible(self, identity: dict, path: str | Path = "the state") -> None:
        """Refuse a state made by another magi version, config, checkpoint or compat mode.

        Raises:
            StateError: one line (<= 200 characters) naming what differs: the config fields that
                differ with both values (states from before the fields were recorded: "config").
        """
        mine = self.meta.get("identity", {})
        if mine.get("magi_version") != identity.get("magi_version"):
            why = f"another magi version ({mine.get('magi_version')}, this is {identity.get('magi_version')})"
        elif mine.get("compat") != identity.get("compat"):
            why = f"another compat mode ({mine.get('compat')}, this run {identity.get('compat')})"
        elif mine.get("config_hash") != identity.get("config_hash"):
            why = _config_difference(mine.get("config"), identity.get("config"))
        elif mine.get("checkpoint_hash") != identity.get("checkpoint_hash"):
            why = "another checkpoint (the weight files in runtime_config.load changed since it was saved)"
        else:
            return
        raise StateError(f"{shown_path(path)} was made with {why}; use the same setup"[:200])


def _digest(text: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(text.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


REQUEST_FIELDS = ("seed", "num_frames")  # runtime fields a state records itself


def config_hash(cfg: object) -> str:
    """sha256 of a config's fields (paths included: they name the weights), less the request's
    own seed and length (kept in the state: a resume need not repeat --seed / --num_frames)."""
    fields = dataclasses.asdict(cfg)
    fields.pop("source", None)  # where the config file was read from
    for name in REQUEST_FIELDS:
        fields.get("runtime", {}).pop(name, None)
    raw = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def checkpoint_hash(folder: str | Path) -> str:
    """sha256 of the checkpoint's weight index (names, sizes of the weight files and the index)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".zst")):
            h.update(f"{f.relative_to(folder)}:{f.stat().st_size}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def config_fields(cfg: object) -> dict[str, object]:
    """The config as flat ``section.field`` -> value (JSON-able), less the request's own fields:
    kept in new states so a mismatch can name the fields that differ."""
    fields = dataclasses.asdict(cfg)
    fields.pop("source", None)
    flat = {}
    for section, values in fields.items():
        for name, value in values.items() if isinstance(values, dict) else [("", values)]:
            if not (section == "runtime" and name in REQUEST_FIELDS):
                flat[f"{section}.{name}" if name else section] = json.loads(json.dumps(value, default=str))
    return flat


def _config_difference(saved: dict | None, current: dict | None) -> str:
    """'another config (runtime.video_size_h 64, this run 128; ...)': the first fields that differ."""
    if not saved or not current:
        return "another config (a state from before magi named the fields; compare the config files)"
    names = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    shown = "; ".join(f"{k} {saved.get(k)}, this run {current.get(k)}" for k in names[:3])
    more = f"; {len(names) - 3} more" if len(names) > 3 else ""
    return f"another config ({shown}{more})"


def state_identity(cfg: object, compat: str) -> dict:
    """What a saved state must share with a run of ``cfg`` to be resumed by it (no model loaded)."""
    return {
        "magi_version": __version__,
        "compat": compat,
        "config_hash": config_hash(cfg),
        "checkpoint_hash": checkpoint_hash(cfg.runtime.load),
        "config": config_fields(cfg),
    }


def open_state(
    state: str | Path | GenerationState, identity: dict, *, finished: bool
) -> tuple[GenerationState, object]:
    """Load (when a path) and check a state for resume (``finished=False``) or extend (True).

    Returns:
        (the state, how errors name it).

    Raises:
        StateError: damaged, from another setup, or finished / unfinished against ``finished``.
    """
    loaded = state if isinstance(state, GenerationState) else GenerationState.load(state)
    where = "the state" if isinstance(state, GenerationState) else shown_path(state)
    loaded.check_compatible(identity, where)
    if finished and not loaded.meta.get("finished"):
        raise StateError(f"{where} is not a finished run; resume it first, then extend it")
    if not finished and loaded.meta.get("finished"):
        raise StateError(f"{where} is a finished run: nothing left to resume")
    return loaded, where


def video_frames(state: GenerationState) -> int:
    """Frames the run's output video holds at this state: an earlier video it was appended to
    (an extension written onto the video it extends; states before this field: none), plus its own."""
    return int(state.meta.get("earlier_frames", 0)) + int(state.meta["frames_done"])


def state_tail(state: GenerationState) -> list[tuple[int, torch.Tensor]]:
    """The (chunk, clean latent) pairs a state keeps for extend, oldest first."""
    tail = [(int(k.split(".", 1)[1]), v) for k, v in state.extra.items() if k.startswith("clean.")]
    return sorted(tail, key=lambda pair: pair[0])
