"""Voltage control by PV inverters on distribution feeders (registrations only).

Importing this package is cheap: it registers ids and entry points; pandapower, simbench and
lightsim2grid are imported only when an env is built. The env card is in
``scenarios/grid/env.py``; feeders and the power flow in ``scenarios/grid/feeder.py``; the
baselines (no-control, IEEE 1547 volt-var, centralised OPF) in ``scenarios/grid/controllers.py``.

Default PV penetrations (``pv_scale``) were chosen so that, without control, about two thirds
of the 92 summer days (1 June - 31 August of the profile year) see some bus leave
[0.95, 1.05] p.u. Measured with ``no-control`` over all summer days (both splits), share of days
with a violation (mean controllable rate): mv-rural at pv_scale 3: 68% (0.84; at 1: 26%, driven
by the feeder's wind parks); lv-rural at 4: 66% (0.90; at 2: 0%); ieee33 at 2: 72% (0.88; at 1:
0%). Every violation seen is an over-voltage.
"""

from __future__ import annotations

from marl.core.registry import ControllerSpec, ScenarioSpec, register_controller, register_scenario

__all__: list[str] = []

_ENV = "scenarios.grid.env:GridVoltageEnv"
_SIM = "lightsim2grid"
_TEST = {"horizon": 8}

register_scenario(
    ScenarioSpec(
        id="grid/mv-rural",
        entry_point=_ENV,
        description="SimBench 1-MV-rural, 92 PV inverters (MV plants + aggregated LV rooftop PV)",
        simulator=_SIM,
        n_agents=92,
        kwargs={"feeder": "1-MV-rural--0-sw", "pv_scale": 3.0},
        test_kwargs=_TEST,
        default_controller="no-control",
    )
)
register_scenario(
    ScenarioSpec(
        id="grid/lv-rural",
        entry_point=_ENV,
        description="SimBench 1-LV-rural2 (97 buses, 0.4 kV), 8 rooftop PV inverters",
        simulator=_SIM,
        n_agents=8,
        # hops: the fewest feeder hops that connect every inverter (the PV units sit far apart).
        kwargs={"feeder": "1-LV-rural2--0-sw", "pv_scale": 4.0, "hops": 20},
        test_kwargs=_TEST,
        default_controller="no-control",
    )
)
register_scenario(
    ScenarioSpec(
        id="grid/ieee33",
        entry_point=_ENV,
        description="IEEE 33-bus (case33bw), 6 PV inverters, SimBench profiles (MAPDN-style)",
        simulator=_SIM,
        n_agents=6,
        # hops: the fewest feeder hops that connect the six PV buses.
        kwargs={"feeder": "ieee33", "pv_scale": 2.0, "hops": 12},
        test_kwargs=_TEST,
        default_controller="no-control",
    )
)

for _name, _cls, _desc in (
    ("no-control", "NoControl", "q = 0 for every inverter (unity power factor)"),
    ("volt-var", "VoltVar", "IEEE 1547-2018 Category B default volt-var curve, local"),
    ("opf", "OptimalDispatch", "centralised optimal reactive dispatch per step (SLP + HiGHS), full information"),
):
    register_controller(ControllerSpec("grid", _name, f"scenarios.grid.controllers:{_cls}", _desc))
