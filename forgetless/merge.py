"""``forgetless merge``: the results folders of one experiment, run in parts, gathered into one.

An output folder takes one ``forgetless run`` at a time (it is locked). To use several processes or machines, users
run disjoint method lists (or seeds) into separate folders; ``forgetless report`` and the landscape step then want
them in one. :func:`merge_results` copies, from each source folder, every finished run: its record
``runs/RUN_ID.json`` and what belongs to it (``adapters/RUN_ID``, ``adapters/RUN_ID.selected``, ``landscape/RUN_ID``,
``logs/RUN_ID``), and the cached general stages (``stages/KEY``, content-keyed) that the destination lacks.

Nothing is overwritten and nothing is lost:

* a run already in the destination with the same record (byte for byte) is skipped; with a different record (other
  settings, or the same settings measured again) the merge is refused before anything is copied, naming both files;
  so is the same run in two sources with different records;
* what a destination holds for a run it has no record of (the adapter of a run interrupted there) is renamed
  ``NAME.unrecorded`` before the source's copy takes its place;
* every folder is copied under a temporary name and renamed, and a run's record is written last: a merge that is
  interrupted leaves no half-copied run that counts as finished, and can simply be repeated;
* the sources are only read, and locked while that happens (a folder a ``forgetless run`` still writes is refused);
* records set aside by ``--rerun-changed`` (``runs/RUN_ID.json.DIGEST``), checkpoints of unfinished runs and the
  tables and figures (which the destination regenerates) are not copied.
"""

from __future__ import annotations

import contextlib
import filecmp
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from forgetless.config import ConfigError

RUN_PARTS = ("adapters/{rid}", "adapters/{rid}.selected", "landscape/{rid}", "logs/{rid}")


@dataclass
class MergeSummary:
    copied: dict[str, list[str]] = field(default_factory=dict)  # source folder -> run ids copied from it
    skipped: list[str] = field(default_factory=list)  # run ids the destination already had, identical
    stages: list[str] = field(default_factory=list)  # general-stage folders copied
    set_aside: list[str] = field(default_factory=list)  # destination paths renamed NAME.unrecorded

    def lines(self, dest: Path) -> list[str]:
        out = [f"merge: {len(runs)} run(s) from {src}" for src, runs in self.copied.items()]
        if self.skipped:
            out.append(f"merge: {len(self.skipped)} run(s) already in {dest} with the same record, skipped")
        if self.stages:
            out.append(f"merge: {len(self.stages)} cached general stage(s) copied")
        out += [f"merge: {path} had no record; kept as {path}.unrecorded" for path in self.set_aside]
        return out


def _records(folder: Path) -> dict[str, Path]:
    runs = folder / "runs"
    if not runs.is_dir():
        raise ConfigError(f"{folder}: not a forgetless results folder (no runs/ folder in it)")
    return {path.stem: path for path in sorted(runs.glob("*.json"))}


def _free_name(path: Path, suffix: str) -> Path:
    target, n = path.with_name(f"{path.name}.{suffix}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{suffix}.{n}"), n + 1
    return target


def _copy_in(src: Path, dst: Path) -> None:
    """Copy a file or folder to ``dst`` (absent) under a temporary name, then rename it into place."""
    tmp = dst.with_name(f".{dst.name}.merging")
    if tmp.exists():  # left by an interrupted merge
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        shutil.copy2(src, tmp)
    tmp.replace(dst)


def _plan(dest: Path, sources: list[Path]) -> tuple[dict[Path, list[tuple[str, Path]]], list[str]]:
    """(runs to copy per source, run ids already in the destination); ConfigError listing every conflict."""
    have = _records(dest) if (dest / "runs").is_dir() else {}
    chosen: dict[str, Path] = {}  # run id -> the record that will be (or is) in the destination
    plan: dict[Path, list[tuple[str, Path]]] = {}
    skipped, conflicts = [], []
    for src in sources:
        plan[src] = []
        for rid, path in _records(src).items():
            other = chosen.get(rid) or have.get(rid)
            if other is None:
                chosen[rid] = path
                plan[src].append((rid, path))
            elif filecmp.cmp(other, path, shallow=False):
                if other == have.get(rid):
                    skipped.append(rid)
            else:
                conflicts.append(f"  {rid}: {other} and {path} differ")
    if conflicts:
        raise ConfigError(f"merge: {len(conflicts)} run(s) recorded differently in two folders; nothing was copied:\n"
                          + "\n".join(conflicts) + "\ndelete (or move away) the record you do not want, or merge "
                          "into a new folder")
    return plan, skipped


def merge_results(dest: Path | str, sources: list[Path | str]) -> MergeSummary:
    """Copy every finished run (record, adapter, landscape, logs) and the cached general stages of ``sources`` into
    ``dest`` (created if absent). Refuses, before copying anything, a run recorded differently in two folders, a
    source that is not a results folder or that a ``forgetless run`` holds, and a source that is ``dest``."""
    from forgetless.experiment import check_output, output_lock

    dest = Path(dest)
    sources = [Path(s) for s in sources]
    if not sources:
        raise ConfigError("merge: give at least one source folder")
    for src in sources:
        _records(src)  # a results folder?
        if dest.exists() and src.resolve() == dest.resolve():
            raise ConfigError(f"merge: {src} is the destination itself")
    if len({s.resolve() for s in sources}) < len(sources):
        raise ConfigError("merge: a source folder is given twice")
    check_output(dest, "merge --into")
    summary = MergeSummary()
    with contextlib.ExitStack() as locks:
        locks.enter_context(output_lock(dest))
        for src in sources:
            locks.enter_context(output_lock(src))
        plan, summary.skipped = _plan(dest, sources)
        for src, runs in plan.items():
            for rid, record in runs:
                for part in RUN_PARTS:
                    source, target = src / part.format(rid=rid), dest / part.format(rid=rid)
                    if target.exists():  # the destination has no record of this run: an interrupted run's leftover
                        target.rename(_free_name(target, "unrecorded"))
                        summary.set_aside.append(str(target))
                    if source.exists():
                        _copy_in(source, target)
                _copy_in(record, dest / "runs" / record.name)  # last: the run counts as finished once this is there
            summary.copied[str(src)] = [rid for rid, _ in runs]
            for stage in sorted((src / "stages").glob("*")) if (src / "stages").is_dir() else []:
                if stage.is_dir() and not stage.name.startswith(".") and not (dest / "stages" / stage.name).exists():
                    _copy_in(stage, dest / "stages" / stage.name)
                    summary.stages.append(stage.name)
    return summary
