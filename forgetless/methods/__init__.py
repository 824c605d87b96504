"""The registry of methods an experiment can name, and how a list of them becomes one recipe.

A method name stands for three things, any of which may be empty:

* which stages run: ``base`` none, ``lora-mu`` the domain stage only, ``lora-nu-mu`` general then domain;
* LoRA setting overrides (``rslora`` switches on rank-stabilized scaling);
* a plugin, a :class:`~forgetless.training.hooks.Method` built from the entry's options, which are one dataclass
  per method (:class:`~forgetless.methods.common.Options`: help text, choices, which act on the domain stage only).

An experiment entry is a name (``lora-nu-mu``), a mapping with options (``{name: hlora, phi: 0.001}``)
or a list of those that compose (``[hlora, sam]``). Adding a method is adding a file under ``methods/`` that calls
:func:`register`, and one import line at the end of this file so that the registry knows it; no other code changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forgetless.methods.common import Options
from forgetless.training.hooks import Method

GENERAL, DOMAIN = "general", "domain"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    stages: tuple[str, ...] | None = None  # None: no opinion; the default is general then domain
    lora: dict[str, Any] = field(default_factory=dict)
    plugin: type[Method] | None = None  # built as plugin(options); None: a name without a plugin (base, lora-mu)
    # Options this name pins (hlora-no-layer: layer_wise=False); giving another value is an error.
    fixed: dict[str, Any] = field(default_factory=dict)
    # Another method whose general stage this one's equals (same training, same recorded state): they share
    # the cached general stage, so their domain stages start from the very same adapter.
    general_as: str | None = None

    @property
    def options(self) -> type[Options] | None:
        return self.plugin.Options if self.plugin is not None else None

    @property
    def domain_options(self) -> frozenset[str]:
        """Options that act on the domain stage only: runs differing only in them share a cached general stage."""
        return self.options.domain_only() if self.options is not None else frozenset()

    @property
    def weight_option(self) -> tuple[str, Any] | None:
        """(option, default) that weights the method's regularizer; the report sweeps it (phi, lambda)."""
        return self.options.weight_option() if self.options is not None else None

    def build(self, given: dict[str, Any]) -> Method | None:
        if self.plugin is None:
            if given:
                raise ValueError(f"method {self.name!r} takes no options, got {sorted(given)}")
            return None
        return self.plugin(self.plugin.Options.from_entry(self.name, given, self.fixed))


@dataclass
class Recipe:
    """What one run does: its label, stages, LoRA overrides and plugins (in the order given)."""

    label: str
    stages: tuple[str, ...]
    lora: dict[str, Any]
    plugins: list[Method]
    entries: list[dict[str, Any]]  # the normalized entries, for run signatures


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    REGISTRY[spec.name] = spec
    return spec


register(MethodSpec("base", "the model as loaded, no tuning", stages=()))
register(MethodSpec("lora-mu", "LoRA on the domain only", stages=(DOMAIN,)))
register(MethodSpec("lora-nu-mu", "LoRA on general text, then continued on the domain", stages=(GENERAL, DOMAIN)))
register(MethodSpec("rslora", "LoRA with rank-stabilized scaling alpha/sqrt(r) (general then domain unless composed, "
                              "e.g. [lora-mu, rslora])", lora={"use_rslora": True}))


def _normalize(entry: Any) -> list[dict[str, Any]]:
    if isinstance(entry, str):
        return [{"name": entry}]
    if isinstance(entry, dict):
        if "name" in entry:
            return [dict(entry)]
        if len(entry) == 1:  # {hlora: {phi: 1e-3}}
            (name, options), = entry.items()
            if options is not None and not isinstance(options, dict):
                raise ValueError(f"cannot read method entry {entry!r}: the options of {name!r} must be a mapping "
                                 f"({{{name}: {{option: value}}}})")
            return [{"name": name, **(options or {})}]
    if isinstance(entry, (list, tuple)) and entry:
        return [item for part in entry for item in _normalize(part)]
    raise ValueError(f"cannot read method entry {entry!r}: use a name, {{name: ..., option: ...}} or a list of them")


def method_label(entry: Any) -> str:
    """A stable, readable label: ``hlora+sam``, ``hlora(phi=0.01)`` (the options as given, sorted by name)."""
    parts = []
    for item in _normalize(entry):
        options = {k: v for k, v in item.items() if k != "name"}
        opts = ",".join(f"{k}={options[k]}" for k in sorted(options))
        parts.append(f"{item['name']}({opts})" if opts else item["name"])
    return "+".join(parts)


def identity_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The normalized entries as a run's identity sees them: the options written, plus those left out whose default
    changed since identities were fixed (``option(..., was=...)``), at their current default. A run recorded under
    an old default is then "changed" (refused or redone), and one that wrote its options keeps its identity."""
    out = []
    for item in entries:
        spec = REGISTRY.get(item["name"])
        changed = spec.options.changed_defaults() if spec is not None and spec.options is not None else {}
        names = spec.options.field_names() if changed else {}
        given = {names.get(k, k) for k in item if k != "name"}
        out.append(dict(item) | {k: v for k, v in changed.items() if names.get(k, k) not in given})
    return out


def general_stage_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The normalized entries (as :func:`identity_entries` sees them) without their domain-only options and without
    the methods that leave the general stage as it is (:meth:`Method.shapes_general_stage`): what a cached general
    stage depends on. A list left empty by that is ``lora-nu-mu``'s (plain LoRA on general text)."""
    out = []
    kept = [item for item in identity_entries(entries) if _shapes_general_stage(item)]
    for item in kept or [{"name": "lora-nu-mu"}]:
        spec = REGISTRY.get(item["name"])
        drop = spec.domain_options if spec is not None else frozenset()
        name = spec.general_as if spec is not None and spec.general_as else item["name"]
        out.append({k: v for k, v in item.items() if k not in drop} | {"name": name})
    return out


def _shapes_general_stage(item: dict[str, Any]) -> bool:
    spec = REGISTRY.get(item["name"])
    if spec is None or spec.plugin is None:
        return True  # a name without a plugin stays in the key as it always was
    plugin = spec.build({k: v for k, v in item.items() if k != "name"})
    return plugin is None or plugin.shapes_general_stage()


def resolve(entry: Any) -> Recipe:
    """Turn an experiment's method entry into a :class:`Recipe`, with clear errors."""
    items = _normalize(entry)
    stages: tuple[str, ...] | None = None
    lora: dict[str, Any] = {}
    plugins: list[Method] = []
    for item in items:
        name = item["name"]
        if name not in REGISTRY:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
        spec = REGISTRY[name]
        options = {k: v for k, v in item.items() if k != "name"}
        if spec.stages is not None:
            if stages is not None and stages != spec.stages:
                raise ValueError(f"methods in {method_label(entry)!r} disagree on which stages to run")
            stages = spec.stages
        lora.update(spec.lora)
        plugin = spec.build(options)
        if plugin is not None:
            twin = next((other for other in plugins if type(other) is type(plugin)), None)
            if twin is not None:  # each one's penalty added to the loss, SAM perturbing twice, one state file
                raise ValueError(f"{method_label(entry)!r}: {type(plugin).__name__} twice in one composition "
                                 f"({name!r} after another {type(plugin).__name__} entry): list each method once, "
                                 "with the options it should have")
            plugins.append(plugin)
    stages = (GENERAL, DOMAIN) if stages is None else stages
    for plugin in plugins:
        plugin.check_composition([other for other in plugins if other is not plugin])
    if plugins and not stages:
        raise ValueError(f"{method_label(entry)!r}: a plugin method needs at least one training stage")
    return Recipe(label=method_label(entry), stages=stages, lora=lora, plugins=plugins, entries=items)


from forgetless.methods import hlora as _hlora  # noqa: E402,F401
from forgetless.methods import sam as _sam  # noqa: E402,F401
from forgetless.methods import replay as _replay  # noqa: E402,F401
from forgetless.methods import wise_ft as _wise_ft  # noqa: E402,F401
from forgetless.methods import ewc as _ewc  # noqa: E402,F401
