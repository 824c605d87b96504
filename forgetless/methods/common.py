"""What the anti-forgetting methods share, kept once (as Avalanche's ``training/utils.py`` does for EWC, SI, MAS).

* **Options**: each method's options are one dataclass of :func:`option` fields (help text, choices, whether the
  option acts on the domain stage only, the YAML name). The registry, run labels, ``repr``, validation and the
  stored metadata all read it.
* **Distributed reductions**: :func:`all_reduce_` averages or sums tensors over processes in one flat buffer.
* **Storage dtypes** of method state (:data:`STORAGE_DTYPES`).
* **Timed sections** that do not stop the device's queue (:class:`Timer`: CUDA events on a GPU).
* **Method-state files** (:class:`StateFile`): safetensors with JSON metadata, written atomically, read lazily at
  the domain stage's start, and checked against the model with errors that name the module and the mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from forgetless.training.config import as_bool, as_float, as_int

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------- options
_UNCHANGED = object()


def option(default: Any, help: str, *, domain: bool = False, choices: Sequence[Any] | None = None,
           yaml: str | None = None, weight: bool = False, was: Any = _UNCHANGED) -> Any:
    """A method option: a dataclass field whose metadata the registry, labels and validation read.

    ``domain``: acts on the domain stage only (runs differing only in such options share a cached general stage).
    ``yaml``: the name in an experiment file when it differs from the field's (``lambda`` is a Python keyword).
    ``weight``: the weight of the method's regularizer, which the report sweeps.
    ``was``: the option's default when run identities were fixed, given when the default has changed since. A run
    identity lists the options written in the experiment only; an option left out whose default changed enters it
    with its new value (:meth:`Options.changed_defaults`), so a run recorded under the old default is seen as
    changed, never silently reused, while runs that wrote the option keep their identity.
    """
    meta = {"help": help, "domain": domain, "choices": tuple(choices) if choices else None, "yaml": yaml,
            "weight": weight, "was": was}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Options:
    """Base of a method's options. Subclasses are dataclasses of :func:`option` fields and may add :meth:`check`."""

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{self.yaml_name(f.name)} must be one of {list(choices)}, got {value!r}")
            name = self.yaml_name(f.name)
            if f.type in ("float", float):
                number = as_float(name, value)
                if not math.isfinite(number):  # an infinite weight or radius makes every number non-finite
                    raise ValueError(f"{name} must be a finite number, got {value!r}")
                setattr(self, f.name, number)
            elif f.type in ("bool", bool):
                setattr(self, f.name, as_bool(name, value))
            elif f.type in ("int", int) or (f.type == "int | None" and value is not None):
                setattr(self, f.name, as_int(name, value))
            elif f.type in ("str", str) and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
            elif str(f.type).startswith("list[") and not isinstance(value, (list, tuple, str, int, float)):
                raise ValueError(f"{name} must be a list, got {value!r}")  # one value stands for a list of it
        self.check()

    def check(self) -> None:
        """Range checks across options; raise ValueError naming the option."""

    @classmethod
    def yaml_name(cls, name: str) -> str:
        for f in fields(cls):
            if f.name == name:
                return f.metadata.get("yaml") or f.name
        return name

    @classmethod
    def field_names(cls) -> dict[str, str]:
        """YAML name -> field name."""
        return {(f.metadata.get("yaml") or f.name): f.name for f in fields(cls)}

    @classmethod
    def from_entry(cls, method: str, given: Mapping[str, Any], fixed: Mapping[str, Any] | None = None) -> Options:
        """Build from an experiment entry's options (YAML names), with errors naming the method and the option.

        ``fixed``: options that the method's name pins (``hlora-no-layer``: ``layer_wise=False``)."""
        names, fixed = cls.field_names(), dict(fixed or {})
        unknown = sorted(k for k in given if k not in names and k not in names.values())
        if unknown:  # the names, and the nearest one (the full help of every option buried the answer)
            import difflib

            near = difflib.get_close_matches(unknown[0], list(names), n=1)
            hint = f"did you mean {near[0]!r}? ({cls.help_text(near[0])}); " if near else ""
            raise ValueError(f"method {method!r} has no option {unknown[0]!r}; {hint}its options: "
                             f"{', '.join(names)} (README.md describes them)")
        values: dict[str, Any] = {}
        for key, value in given.items():
            if names.get(key, key) in values:
                raise ValueError(f"bad options for method {method!r}: {key!r} names the same option as another key "
                                 f"({cls.yaml_name(names.get(key, key))!r}); give it once")
            values[names.get(key, key)] = value
        pinned = sorted(k for k in values if k in fixed and values[k] != fixed[k])
        if pinned:
            raise ValueError(f"method {method!r} fixes {cls.yaml_name(pinned[0])} to {fixed[pinned[0]]!r}")
        return cls(**(values | fixed))

    @classmethod
    def domain_only(cls) -> frozenset[str]:
        """Names (YAML and field) of the options that act on the domain stage only."""
        return frozenset(n for yaml, name in cls.field_names().items() if _meta(cls, name).get("domain")
                         for n in (yaml, name))

    @classmethod
    def weight_option(cls) -> tuple[str, Any] | None:
        """(YAML name, default) of the regularizer's weight, if the method has one."""
        for f in fields(cls):
            if f.metadata.get("weight"):
                return f.metadata.get("yaml") or f.name, f.default
        return None

    @classmethod
    def changed_defaults(cls) -> dict[str, Any]:
        """YAML name -> current default, of the options whose default changed since run identities were fixed."""
        out = {}
        for f in fields(cls):
            name = f.metadata.get("yaml") or f.name
            if cls.identity_default(name) != _default(f):
                out[name] = _default(f)
        return out

    @classmethod
    def identity_default(cls, name: str) -> Any:
        """The value of option ``name`` (YAML name) in a run whose identity does not list it: its default when run
        identities were fixed (``was``), else its default."""
        f = next(f for f in fields(cls) if (f.metadata.get("yaml") or f.name) == name)
        was = f.metadata.get("was", _UNCHANGED)
        return _default(f) if was is _UNCHANGED else was

    @classmethod
    def help_text(cls, only: str | None = None) -> str:
        """Every option (or the one named ``only``): name, default, stage, help."""
        parts = []
        for f in fields(cls):
            if only is not None and (f.metadata.get("yaml") or f.name) != only:
                continue
            default = _default(f)
            scope = ", domain stage" if f.metadata.get("domain") else ""
            parts.append(f"{f.metadata.get('yaml') or f.name} (default {default!r}{scope}): {f.metadata.get('help', '')}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The options under their YAML names (the run's stored metadata)."""
        return {self.yaml_name(f.name): getattr(self, f.name) for f in fields(self)}

    def __repr__(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _meta(cls: type, name: str) -> Mapping[str, Any]:
    return next(f.metadata for f in fields(cls) if f.name == name)


# --------------------------------------------------------------------------------------------- distributed
def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if world_size() > 1 else 0


_REDUCE_BUCKET = 1 << 26  # elements per all-reduce buffer (256 MiB in float32): a bounded copy, not the whole state


def all_reduce_(tensors: Sequence[torch.Tensor], op: str = "mean") -> None:
    """Sum or average ``tensors`` in place over processes; no-op for one process.

    Tensors of one dtype and device go through flat buffers of up to ``_REDUCE_BUCKET`` elements (a few calls, and
    never a second copy of a whole method state). Tensors in CPU memory (offloaded state) are reduced through the
    GPU, a bucket at a time, when the process group's backend is NCCL (which reduces CUDA tensors only)."""
    import torch.distributed as dist

    world = world_size()
    if world <= 1 or not tensors:
        return
    if op not in ("mean", "sum"):
        raise ValueError(f"op must be 'mean' or 'sum', got {op!r}")
    through_gpu = dist.get_backend() == "nccl" and torch.cuda.is_available()
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (_, device), group in groups.items():
        for bucket in _buckets(group, _REDUCE_BUCKET):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            if device.type == "cpu" and through_gpu:
                flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(flat)
            if op == "mean":
                flat.div_(world)
            start = 0
            for t in bucket:
                t.copy_(flat[start:start + t.numel()].view_as(t))
                start += t.numel()


def _buckets(tensors: Sequence[torch.Tensor], limit: int):
    """``tensors`` in order, in runs of at most ``limit`` elements (a larger tensor is a run of its own)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + t.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def shard(items: Sequence[Any]) -> list[Any]:
    """This process's share of ``items`` (every ``world``-th, from its rank); all of them for one process."""
    return list(items)[rank()::world_size()]


# ------------------------------------------------------------------------------------------------ timing
def _cuda_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


class Timer:
    """Accumulates the time of ``with timer:`` sections without stopping the device's queue.

    On the CPU: wall time. On CUDA: the device time between two events recorded on the current stream at the
    section's ends, which is what the section's kernels (and any wait for their launches) took where they ran. No
    section waits for the device: a timed section in every optimizer step (HLoRA's importance recording) would
    otherwise drain the queue four times a step. Finished events are folded in as later sections end; reading
    :attr:`seconds` waits for the last one (once, at a stage's end)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self._seconds = 0.0
        self._started: Any = 0.0
        self._pending: list[tuple[Any, Any]] = []  # CUDA (start, end) events not read yet

    @property
    def _events(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    @property
    def seconds(self) -> float:
        self._fold(wait=True)
        return self._seconds

    def _fold(self, wait: bool) -> None:
        waiting = []
        for start, end in self._pending:
            if wait:
                end.synchronize()
            elif not end.query():  # not reached by the device yet: read later
                waiting.append((start, end))
                continue
            self._seconds += start.elapsed_time(end) / 1000.0
        self._pending = waiting

    def __enter__(self) -> Timer:
        if self._events:
            self._started = _cuda_event()
            self._started.record()
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._events:
            end = _cuda_event()
            end.record()
            self._pending.append((self._started, end))
            if len(self._pending) >= 64:
                self._fold(wait=False)
        else:
            self._seconds += time.perf_counter() - self._started


# ------------------------------------------------------------------------------------------ state files
class StateFile:
    """A method's state on disk: ``{key: tensor}`` in safetensors, with JSON metadata under ``kind``."""

    def __init__(self, filename: str, kind: str, what: str) -> None:
        self.filename, self.kind, self.what = filename, kind, what  # what: "HLoRA importance", for messages

    def locate(self, directory: str | Path) -> Path:
        path = Path(directory)
        path = path / self.filename if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no {self.what} file at {path}")
        return path

    def save(self, directory: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
             dtype: torch.dtype | None = None) -> Path:
        """Write atomically (a temporary file renamed into place): a half-written file is never read."""
        from safetensors.torch import save_file

        path = Path(directory) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {k: t.detach().to("cpu", dtype or t.dtype).contiguous() for k, t in tensors.items()}
        tmp = _temporary(path)
        try:
            save_file(payload, str(tmp), metadata={self.kind: json.dumps(dict(metadata), default=str)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def copy(self, source: Path, directory: str | Path) -> Path:
        """Save a state that was loaded lazily and never materialized: the file itself is the state."""
        path = Path(directory) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if source.resolve() != path.resolve():
            tmp = _temporary(path)
            try:
                shutil.copyfile(source, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    def load(self, path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``({key: tensor on the cpu}, metadata)``; a corrupt file is an error naming it."""
        from safetensors import SafetensorError, safe_open

        path = self.locate(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = json.loads((fh.metadata() or {}).get(self.kind, "{}"))
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable {self.what} file ({err}); delete it to recompute") from err
        return tensors, metadata


def _temporary(path: Path) -> Path:
    """A temporary name beside ``path`` of this process alone: two processes writing the same state (workers of one
    experiment, ranks that all save) each rename their own whole file into place, never one half-written."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


class PendingState:
    """One plugin's state file: remembered by ``load_state``, read when the domain stage starts (the model is then
    on its device, and the state can be checked against it), and saved again by ``save_state``."""

    def __init__(self, file: StateFile) -> None:
        self.file = file
        self.path: Path | None = None  # remembered, not read yet
        self.source = ""  # the file the state came from, for error messages ("" when computed in this run)

    def remember(self, directory: str | Path, missing_ok: bool = False) -> None:
        """Remember ``directory``'s state file; ``missing_ok``: a folder without one (a cached general stage trained
        by a recipe without this method) leaves nothing remembered instead of raising FileNotFoundError."""
        try:
            self.path = self.file.locate(directory)
        except FileNotFoundError:
            if not missing_ok:
                raise
            self.path = None
        self.source = ""

    def take(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The remembered file's ``(tensors, metadata)``, once; None when nothing is remembered."""
        if self.path is None:
            return None
        loaded = self.file.load(self.path)
        self.source, self.path = str(self.path), None
        return loaded

    def save(self, directory: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
             dtype: torch.dtype | None = None) -> Path | None:
        """Write ``tensors``; a remembered file that was never read is the state itself and is copied as is
        (returns None then)."""
        if not tensors:
            if self.path is None:
                raise ValueError(f"{self.file.what}: nothing to save (the general stage has not run)")
            self.file.copy(self.path, directory)
            return None
        return self.file.save(directory, tensors, metadata, dtype)


def check_modules(what: str, source: str | Path, have: Mapping[str, torch.Tensor],
                  expected: Mapping[str, tuple[int, ...]]) -> None:
    """State keyed by module must cover exactly the model's LoRA modules, with the update's shapes.

    The error names the state (``what``, ``source``), the first mismatching module and the mismatch.
    """
    for name, shape in expected.items():
        if name not in have:
            raise ValueError(f"{what} ({source}) has no entry for LoRA module {name!r} of this model")
        if tuple(have[name].shape) != tuple(shape):
            raise ValueError(f"{what} ({source}) of module {name!r} has shape {tuple(have[name].shape)}, "
                             f"the model's LoRA update there is {tuple(shape)}")
    extra = sorted(set(have) - set(expected))
    if extra:
        raise ValueError(f"{what} ({source}) has module {extra[0]!r} that this model has no LoRA layer for "
                         f"({len(extra)} such modules)")
