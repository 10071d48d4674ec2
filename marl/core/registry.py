"""One registry of string ids with lazy entry points.

Four kinds of things are registered, each under a string id:

* scenarios — ``"traffic/grid4x4"``: a PettingZoo ParallelEnv class plus preset config values;
* controllers — ``("traffic", "max-pressure")``: non-learned baselines, per domain;
* protocols — ``"neighbours"``: how agents talk (rule-based or learned);
* algorithms — ``"ippo"``: learning algorithms.

Entries name their implementation as ``"module:attribute"`` and nothing is imported until the
entry is used, so ``marl list`` stays fast and a broken optional dependency only hurts the entries
that need it. Domain packages register their entries when imported; :data:`PLUGIN_MODULES` lists
them. A new scenario is added by calling :func:`register_scenario` in its package ``__init__`` —
the conformance tests then pick it up without further changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from marl.core.config import build_config
from marl.core.errors import unknown

__all__ = [
    "ScenarioSpec",
    "TrainingPreset",
    "ControllerSpec",
    "ProtocolSpec",
    "AlgorithmSpec",
    "register_scenario",
    "register_controller",
    "register_protocol",
    "register_algorithm",
    "scenarios",
    "controllers",
    "protocols",
    "algorithms",
    "scenario_spec",
    "controller_spec",
    "controllers_for",
    "scenario_controller",
    "protocol_spec",
    "algorithm_spec",
    "make_scenario",
    "scenario_config",
    "load",
]

#: Packages whose import registers entries. Order is the order of ``marl list``.
PLUGIN_MODULES: tuple[str, ...] = (
    "scenarios.traffic",
    "scenarios.grid",
    "scenarios.warehouse",
    "comms.protocols",
    "marl.algos",
)


@dataclass(frozen=True)
class TrainingPreset:
    """What ``marl train SCENARIO`` uses when the user gives no options: the settings that worked
    best for that scenario in a sweep a user can rerun (the scenario's registration says which).

    Every field is a default only: ``--algo``, ``--protocol``, ``--steps`` and ``--algo-set`` given on
    the command line win, key by key for ``algo_set``.
    """

    algo: str = "ippo"
    protocol: str = "none"
    steps: int = 20_000  #: total environment steps over all ranks
    algo_set: Mapping[str, Any] = field(default_factory=dict)  #: --algo-set values
    #: --set values of the scenario the learner trains with (its observation interface, e.g.
    #: ``sensing=local``), under the user's ``--set`` key by key; a checkpoint records them, so
    #: ``marl run --policy`` plays under them too.
    sets: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""  #: where the preset comes from (the sweep command and its result)


@dataclass(frozen=True)
class ScenarioSpec:
    """A named scenario: an env class plus preset values for its config dataclass."""

    id: str  #: "domain/name", e.g. "traffic/grid4x4"
    entry_point: str  #: "module:Class"; the class has a ``Config`` dataclass and takes it in __init__
    description: str  #: one line for ``marl list``
    simulator: str  #: e.g. "SUMO (libsumo)", "lightsim2grid", "numpy"
    n_agents: int | None  #: number of agents with the preset config (None: varies)
    kwargs: Mapping[str, Any] = field(default_factory=dict)  #: preset config values
    test_kwargs: Mapping[str, Any] = field(default_factory=dict)  #: extra values for short test runs
    default_controller: str = "random"
    #: The controllers of its domain that apply to it; None: every one that does not name
    #: other scenarios (``ControllerSpec.scenarios``).
    controllers: tuple[str, ...] | None = None
    training: TrainingPreset = field(default_factory=TrainingPreset)  #: defaults of ``marl train``

    @property
    def domain(self) -> str:
        return self.id.split("/", 1)[0]


@dataclass(frozen=True)
class ControllerSpec:
    """A non-learned baseline for one domain: ``act(observations, env, messages) -> actions``."""

    domain: str
    name: str
    entry_point: str
    description: str
    uses_messages: bool = False  #: True if the controller reads what the protocol delivers
    #: The scenario ids it works on; empty: every scenario of its domain that accepts it
    #: (``ScenarioSpec.controllers``).
    scenarios: tuple[str, ...] = ()
    #: What it talks through when ``marl run`` names no ``--protocol`` (talking controllers).
    protocol: str = "none"


@dataclass(frozen=True)
class ProtocolSpec:
    """How agents talk; ``learned`` protocols are torch modules used by learning algorithms."""

    name: str
    entry_point: str
    description: str
    learned: bool = False


@dataclass(frozen=True)
class AlgorithmSpec:
    """A learning algorithm implemented in one file under ``marl/algos/``."""

    name: str
    entry_point: str
    description: str


_SCENARIOS: dict[str, ScenarioSpec] = {}
_CONTROLLERS: dict[tuple[str, str], ControllerSpec] = {}
_PROTOCOLS: dict[str, ProtocolSpec] = {}
_ALGORITHMS: dict[str, AlgorithmSpec] = {}
_loaded = False


def _check_new(kind: str, key: Any, table: Mapping[Any, Any]) -> None:
    if key in table:
        raise ValueError(f"{kind} {key!r} is registered twice")


def register_scenario(spec: ScenarioSpec) -> None:
    if "/" not in spec.id:
        raise ValueError(f"scenario id {spec.id!r} must be 'domain/name'")
    _check_new("scenario", spec.id, _SCENARIOS)
    _SCENARIOS[spec.id] = spec


def register_controller(spec: ControllerSpec) -> None:
    key = (spec.domain, spec.name)
    _check_new("controller", key, _CONTROLLERS)
    _CONTROLLERS[key] = spec


def register_protocol(spec: ProtocolSpec) -> None:
    _check_new("protocol", spec.name, _PROTOCOLS)
    _PROTOCOLS[spec.name] = spec


def register_algorithm(spec: AlgorithmSpec) -> None:
    _check_new("algorithm", spec.name, _ALGORITHMS)
    _ALGORITHMS[spec.name] = spec


def _ensure_loaded() -> None:
    """Import every plugin package once; a package that does not exist yet is skipped."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only tolerate the plugin package itself being absent, never a missing dependency.
            if exc.name != module and not module.startswith(f"{exc.name}."):
                raise


def scenarios(domain: str | None = None) -> dict[str, ScenarioSpec]:
    _ensure_loaded()
    return {k: v for k, v in _SCENARIOS.items() if domain is None or v.domain == domain}


def controllers(domain: str | None = None) -> dict[tuple[str, str], ControllerSpec]:
    _ensure_loaded()
    return {k: v for k, v in _CONTROLLERS.items() if domain is None or k[0] == domain}


def protocols() -> dict[str, ProtocolSpec]:
    _ensure_loaded()
    return dict(_PROTOCOLS)


def algorithms() -> dict[str, AlgorithmSpec]:
    _ensure_loaded()
    return dict(_ALGORITHMS)


def scenario_spec(scenario_id: str) -> ScenarioSpec:
    table = scenarios()
    if scenario_id not in table:
        raise unknown("scenario", scenario_id, table)
    return table[scenario_id]


def controllers_for(scenario_id: str) -> dict[str, ControllerSpec]:
    """The controllers that work on ``scenario_id``: of its domain, not limited to other
    scenarios, and among the scenario's own list when it has one."""
    spec = scenario_spec(scenario_id)
    return {
        name: c
        for (_, name), c in controllers(spec.domain).items()
        if (not c.scenarios or scenario_id in c.scenarios) and (spec.controllers is None or name in spec.controllers)
    }


def scenario_controller(scenario_id: str, name: str) -> ControllerSpec:
    """The controller ``name`` of ``scenario_id``; a one-line error lists the ones that apply."""
    table = controllers_for(scenario_id)
    if name not in table:
        raise unknown(f"controller for {scenario_id}", name, table)
    return table[name]


def controller_spec(domain: str, name: str) -> ControllerSpec:
    table = {n: s for (d, n), s in controllers(domain).items()}
    if name not in table:
        raise unknown(f"controller for {domain}", name, table)
    return table[name]


def protocol_spec(name: str) -> ProtocolSpec:
    table = protocols()
    if name not in table:
        raise unknown("protocol", name, table)
    return table[name]


def algorithm_spec(name: str) -> AlgorithmSpec:
    table = algorithms()
    if name not in table:
        raise unknown("algorithm", name, table)
    return table[name]


def load(entry_point: str) -> Any:
    """Import ``"module:attribute"`` and return the attribute."""
    module_name, _, attr = entry_point.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"entry point {entry_point!r}: {module_name} has no {attr!r}") from None


def scenario_config(scenario_id: str, overrides: Mapping[str, Any] | None = None, *, test: bool = False) -> Any:
    """The validated config dataclass of a scenario: class defaults < preset < (test) < overrides."""
    spec = scenario_spec(scenario_id)
    cls = load(spec.entry_point)
    layers = [spec.kwargs, spec.test_kwargs if test else None, overrides]
    return build_config(cls.Config, *layers, what="--set key")


def make_scenario(
    scenario_id: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    test: bool = False,
    render_mode: str | None = None,
) -> Any:
    """Build the named scenario. ``overrides`` come from ``--set``; ``test`` adds short-run presets;
    ``render_mode`` is passed to the env (Gymnasium's convention; None: no rendering)."""
    spec = scenario_spec(scenario_id)
    cls = load(spec.entry_point)
    config = scenario_config(scenario_id, overrides, test=test)
    return cls(config) if render_mode is None else cls(config, render_mode=render_mode)
