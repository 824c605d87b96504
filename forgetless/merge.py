"""``forgetless merge``: the results folders of one experiment, run in parts, gathered into one.

An output folder takes one ``forgetless run`` at a time (it is locked). To use several processes or machines, users
run disjoint method lists (or seeds) into separate folders; ``forgetless report`` and the landscape step then want
them in one. :func:`merge_results` copies, from each source folder, every finished run: its record
``runs/RUN_ID.json`` and what belongs to it (``adapters/RUN_ID``, ``adapters/RUN_ID.selected``, ``landscape/RUN_ID``,
``logs/RUN_ID``), and the cached general and domain stages (``stages/KEY``, ``stages/domain-KEY``, content-keyed)
that the destination lacks.

Nothing is lost:

* a run already in the destination with the same record is skipped; with a different record (other settings, or
  the same settings measured again) the merge is refused before anything is copied, naming both files; so is the
  same run in two sources with different records. The one difference allowed is the flatness metrics, which the
  landscape step adds to a finished record later: a record that has every entry of the other's and more replaces
  it, with its ``landscape/RUN_ID`` folder;
* what a destination holds for a run it has no record of (the adapter of a run interrupted there) is renamed
  ``NAME.unrecorded`` before the source's copy takes its place;
* every file and folder is copied under a temporary name and renamed into place, and a run's record comes last: a
  merge that is interrupted leaves no half-copied run that counts as finished, and can simply be repeated;
* the sources are only read. A source may still be running: a run counts as finished once its record is written,
  after its adapter, so only finished runs are copied; merge again later for the rest (the destination is locked
  against a second merge or run meanwhile);
* the checkpoints of a run that no folder has finished (``checkpoints/RUN_ID``) come along from a source that no
  ``forgetless run`` holds, when the destination has none for it: the run resumes there. From a source still
  running they are left (they are being rewritten);
* records set aside by ``--rerun-changed`` (``runs/RUN_ID.json.DIGEST``) and the tables and figures (which the
  destination regenerates) are not copied.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from forgetless.config import ConfigError

RUN_PARTS = ("adapters/{rid}", "adapters/{rid}.selected", "landscape/{rid}", "logs/{rid}")


@dataclass
class MergeSummary:
    copied: dict[str, list[str]] = field(default_factory=dict)  # source folder -> run ids copied from it
    updated: list[str] = field(default_factory=list)  # run ids whose flatness metrics were measured further since
    skipped: list[str] = field(default_factory=list)  # run ids the destination already had, identical
    stages: list[str] = field(default_factory=list)  # cached stage folders copied (general-KEY, domain-KEY)
    checkpoints: list[str] = field(default_factory=list)  # unfinished runs whose checkpoints were copied
    running: list[str] = field(default_factory=list)  # sources a forgetless run held (their checkpoints stayed)
    set_aside: list[str] = field(default_factory=list)  # destination paths renamed NAME.unrecorded

    def lines(self, dest: Path) -> list[str]:
        out = [f"merge: {len(runs)} run(s) from {src}" for src, runs in self.copied.items()]
        if self.skipped:
            out.append(f"merge: {len(self.skipped)} run(s) already in {dest} with the same record, skipped")
        if self.updated:
            out.append(f"merge: {len(self.updated)} run(s) with flatness metrics measured since, updated")
        if self.stages:
            kinds = {kind: sum(name.startswith(f"{kind}-") for name in self.stages) for kind in ("general", "domain")}
            said = [f"{n} {kind}" for kind, n in kinds.items() if n]
            out.append(f"merge: {len(self.stages)} cached stage(s) copied ({', '.join(said) or 'of other kinds'})")
        if self.checkpoints:
            out.append(f"merge: checkpoints of {len(self.checkpoints)} unfinished run(s) copied (they resume there): "
                       + ", ".join(self.checkpoints))
        out += [f"merge: {src} is in use by a forgetless run: only its finished runs were copied, not the checkpoints "
                f"of its unfinished ones" for src in self.running]
        out += [f"merge: {path} had no record; kept as {path}.unrecorded" for path in self.set_aside]
        return out


def _records(folder: Path) -> dict[str, Path]:
    runs = folder / "runs"
    if not runs.is_dir():
        raise ConfigError(f"{folder}: not a forgetless results folder (no runs/ folder in it)")
    return {path.stem: path for path in sorted(runs.glob("*.json"))}


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _copy_in(src: Path, dst: Path) -> None:
    """Copy a file or folder to ``dst`` under a temporary name, then rename it into place (over what was there)."""
    tmp, old = dst.with_name(f".{dst.name}.merging"), dst.with_name(f".{dst.name}.replaced")
    for left in (tmp, old):  # by an interrupted merge
        if left.exists():
            _remove(left)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        shutil.copy2(src, tmp)
    if dst.is_dir():  # a folder cannot be renamed over: the old one steps aside first
        dst.rename(old)
    tmp.replace(dst)
    if old.exists():
        _remove(old)


def _same_run(a: dict, b: dict) -> bool:
    """Two records of one run: equal but for the flatness metrics, which the landscape step adds later."""
    return {k: v for k, v in a.items() if k != "landscape"} == {k: v for k, v in b.items() if k != "landscape"}


def _holds(new: dict, old: dict) -> bool:
    """``new`` holds every flatness entry of ``old`` (the same, or measured further since)."""
    have, more = old.get("landscape") or {}, new.get("landscape") or {}
    return all(more.get(k) == v for k, v in have.items())


def _resumable(folder: Path) -> bool:
    """A run's checkpoint folder with a complete checkpoint of some stage in it."""
    from forgetless.training import checkpoint

    return folder.is_dir() and any(checkpoint.latest(stage) is not None for stage in folder.iterdir())


def _plan(dest: Path, sources: list[Path]) -> tuple[dict[Path, list[tuple[str, Path, bool]]], list[str]]:
    """(per source: (run id, its record, whether it replaces the destination's), run ids already in the destination);
    ConfigError listing every conflict."""
    from forgetless.reporting.tables import read_record

    have = _records(dest) if (dest / "runs").is_dir() else {}
    chosen: dict[str, tuple[Path, dict]] = {rid: (path, read_record(path)) for rid, path in have.items()}
    plan: dict[Path, list[tuple[str, Path, bool]]] = {}
    skipped, conflicts = [], []
    for src in sources:
        plan[src] = []
        for rid, path in _records(src).items():
            record = read_record(path)
            if rid not in chosen:
                chosen[rid] = (path, record)
                plan[src].append((rid, path, False))
                continue
            other, known = chosen[rid]
            if not _same_run(known, record) or not (_holds(record, known) or _holds(known, record)):
                conflicts.append(f"  {rid}: {other} and {path} differ")
            elif not _holds(known, record):  # flatness measured in the source since the last merge
                chosen[rid] = (path, record)
                for steps in plan.values():
                    steps[:] = [step for step in steps if step[0] != rid]
                plan[src].append((rid, path, rid in have))
            elif other == have.get(rid):
                skipped.append(rid)
    if conflicts:
        raise ConfigError(f"merge: {len(conflicts)} run(s) recorded differently in two folders; nothing was copied:\n"
                          + "\n".join(conflicts) + "\ndelete (or move away) the record you do not want, or merge "
                          "into a new folder")
    return plan, skipped


def merge_results(dest: Path | str, sources: list[Path | str]) -> MergeSummary:
    """Copy every finished run (record, adapter, landscape, logs) and the cached general stages of ``sources`` into
    ``dest`` (created if absent). Refuses, before copying anything, a run recorded differently in two folders, a
    source that is not a results folder, and a source that is ``dest``."""
    from forgetless.experiment import check_output, folder_in_use, output_lock, set_aside

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
    with output_lock(dest):
        plan, summary.skipped = _plan(dest, sources)
        finished = {rid for folder in [dest, *sources] if (folder / "runs").is_dir() for rid in _records(folder)}
        for src, runs in plan.items():
            for rid, record, replaces in runs:
                for part in RUN_PARTS:
                    source, target = src / part.format(rid=rid), dest / part.format(rid=rid)
                    if replaces and not part.startswith("landscape/"):
                        continue  # the same run: only its flatness is new (the destination's is a subset of it)
                    if not replaces and target.exists():  # no record of this run here: an interrupted run's leftover
                        set_aside(target, "unrecorded")
                        summary.set_aside.append(str(target))
                    if source.exists():
                        _copy_in(source, target)
                _copy_in(record, dest / "runs" / record.name)  # last: the run counts as finished once this is there
                (summary.updated if replaces else summary.copied.setdefault(str(src), [])).append(rid)
            if folder_in_use(src):
                summary.running.append(str(src))
            else:
                for folder in sorted((src / "checkpoints").glob("*")) if (src / "checkpoints").is_dir() else []:
                    target = dest / "checkpoints" / folder.name
                    if folder.name not in finished and not target.exists() and _resumable(folder):
                        _copy_in(folder, target)
                        summary.checkpoints.append(folder.name)
            for stage in sorted((src / "stages").glob("*")) if (src / "stages").is_dir() else []:
                written = stage.is_dir() and not stage.name.startswith(".") and not stage.name.endswith(".tmp")
                if written and not (dest / "stages" / stage.name).exists():  # KEY.tmp: a stage being written
                    _copy_in(stage, dest / "stages" / stage.name)
                    summary.stages.append(stage.name)
    return summary
