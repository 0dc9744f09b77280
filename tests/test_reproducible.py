"""Reproducible mode: every strategy's ``determined`` rule with results told in ticket order gives,
whatever order the results arrive in and however many are in flight, exactly the proposals (and
the state: the runs continue alike) of a one-at-a-time run; the steady-state mode does not. The
reorder buffer, on its own and replaying a store's events. Whole runs of every strategy on pico
models: three slots finishing out of order, and the driver SIGKILLed four times and resumed, end
with the local run's candidates, results and summary (on Ray: tests/test_ray_reproducible.py)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import driver_kill
import numpy as np
import pytest
from reproducible_runs import RUNS, arrival, contents, held_back, local_runs, write_runs

from evomerge.run import resume_run, start_run
from evomerge.run import session as session_module
from evomerge.run.ordering import TicketOrder
from evomerge.search import Evaluation, Proposal, Strategy, build_strategy
from evomerge.search.layout import GenomeLayout, Reference
from evomerge.store import RunStore

N_EXAMPLES = 6


def niche_layout() -> GenomeLayout:
    return GenomeLayout.box(2, ["split", "ratio"], [Reference(f"m{i}", "source") for i in range(3)])


# (id, strategy, settings, dimension or layout, objectives, results)
CASES = [
    ("random", "random", {}, 3, 1, 20),
    ("cmaes", "cmaes", {"popsize": 6}, 4, 1, 30),
    ("cmaes-ipop", "cmaes", {"variant": "full", "popsize": 4, "restarts": 2}, 2, 1, 120),
    ("optuna-tpe", "optuna", {"sampler": "tpe", "sampler_settings": {"n_startup_trials": 4}}, 3, 1, 14),
    ("optuna-tpe-lag", "optuna", {"sampler": "tpe", "sampler_settings": {"n_startup_trials": 4}, "lag": 2}, 3, 1, 14),
    ("optuna-nsga2-lag", "optuna", {"sampler": "nsga2", "sampler_settings": {"population_size": 4}, "lag": 3}, 3, 2, 16),
    ("optuna-random", "optuna", {"sampler": "random"}, 3, 2, 10),
    ("niches", "natural_niches", {"archive_size": 3}, "niches", 1, 24),
    ("niches-lag", "natural_niches", {"archive_size": 3, "lag": 2}, "niches", 1, 24),
]
IDS = [case[0] for case in CASES]
PARALLEL = {"random", "cmaes", "cmaes-ipop", "optuna-tpe-lag", "optuna-nsga2-lag", "optuna-random", "niches-lag"}


def make(case: tuple) -> Strategy:
    _, name, settings, dimension, n_objectives, _ = case
    layout = niche_layout() if dimension == "niches" else dimension
    return build_strategy(name, layout, n_objectives=n_objectives, seed=3, settings=settings)


def evaluate(proposal: Proposal, n_objectives: int, flat: bool = False) -> Evaluation:
    """A deterministic function of the proposal's content (genome, parents, reference): objectives,
    per-example scores, a failure now and then; ``flat``: a plateau (CMA-ES converges: IPOP)."""
    content = json.dumps([None if proposal.genome is None else proposal.genome.tolist(), proposal.parents, proposal.info])
    draw = np.random.default_rng(int.from_bytes(hashlib.blake2b(content.encode(), digest_size=8).digest(), "little"))
    if draw.random() < 0.15 and "reference" not in proposal.info:
        return Evaluation.failure(proposal.ticket, n_objectives)
    scores = (draw.random(N_EXAMPLES) < 0.5).astype(float)
    x = proposal.genome if proposal.genome is not None else np.zeros(2)
    values = np.array([-np.sum((x - 0.3) ** 2), -np.sum((x - 0.7) ** 2)][:n_objectives])
    if flat:
        values = np.zeros(n_objectives)
    ids = tuple(f"t:{i}" for i in range(N_EXAMPLES))
    return Evaluation(proposal.ticket, values, per_example=scores, example_ids=ids)


def one_at_a_time(strategy: Strategy, n: int, flat: bool = False) -> list[Proposal]:
    """The local executor: ask, tell, ask, tell, ..."""
    asked = []
    for _ in range(n):
        asked.append(strategy.ask())
        strategy.tell(evaluate(asked[-1], strategy.n_objectives, flat))
    return asked


def in_parallel(
    strategy: Strategy, n: int, slots: int, seed: int, *, reproducible: bool, flat: bool = False
) -> tuple[list[Proposal], int]:
    """The driver in miniature with ``slots`` workers finishing in a random order: results told in
    ticket order and asks only while ``determined`` (reproducible), or told on arrival and asked
    whenever a slot is free (steady state). Returns the proposals and the most ever in flight."""
    arrival = random.Random(seed)
    order = TicketOrder()
    flying: list[Proposal] = []
    asked: list[Proposal] = []
    most = 0
    while len(asked) < n or flying:
        while len(asked) < n and len(flying) < slots:
            ready = strategy.can_ask() and (not reproducible or strategy.determined())
            if flying and not ready:
                break
            asked.append(strategy.ask())
            order.asked(asked[-1].ticket)
            flying.append(asked[-1])
        most = max(most, len(flying))
        done = flying.pop(arrival.randrange(len(flying)))
        evaluation = evaluate(done, strategy.n_objectives, flat)
        for due in order.arrived(evaluation) if reproducible else [evaluation]:
            strategy.tell(due)
    return asked, most


def same(first: list[Proposal], second: list[Proposal]) -> bool:
    return len(first) == len(second) and all(a.same_as(b) for a, b in zip(first, second))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_any_arrival_order_gives_the_one_at_a_time_run(case):
    n, flat = case[5], case[0] == "cmaes-ipop"
    serial_more = one_at_a_time(make(case), n + 8, flat)
    serial = serial_more[:n]
    assert any(evaluate(p, case[4]).failed for p in serial), "no failure exercised"
    if flat:
        assert serial[-1].info["restart"] > 0, "no IPOP restart exercised"
    for slots, seed in ((2, 0), (3, 1), (5, 2)):
        strategy = make(case)
        asked, most = in_parallel(strategy, n, slots, seed, reproducible=True, flat=flat)
        assert same(asked, serial), f"{slots} workers, arrival seed {seed}: other proposals"
        continued = asked + one_at_a_time(strategy, 8, flat)
        assert same(continued, serial_more), f"{slots} workers, arrival seed {seed}: other state"
        if case[0] in PARALLEL:
            assert most >= 2, "the strategy never let two candidates run at once"


def test_rules_by_hand():
    cma = make(CASES[1])  # popsize 6: six asks, then wait for the generation
    for _ in range(6):
        assert cma.determined()
        cma.ask()
    assert not cma.determined()
    for proposal in cma.outstanding[:5]:
        cma.tell(evaluate(proposal, 1))
    assert not cma.determined()
    cma.tell(evaluate(cma.outstanding[0], 1))  # the generation is complete: the distribution moved
    assert cma.determined()

    tpe = make(CASES[3])  # lag 0: TPE reads every result
    tpe.ask()
    assert not tpe.determined()
    lagged = make(CASES[4])  # lag 2: trial t needs the trials before t - 2
    first, second = lagged.ask(), lagged.ask()
    assert lagged.determined()
    lagged.ask()
    assert not lagged.determined()
    lagged.tell(evaluate(second, 1))
    assert not lagged.determined()  # ticket 0 is still out
    lagged.tell(evaluate(first, 1))
    assert lagged.determined()

    niches = make(CASES[7])  # three seeds asked at once; children only with nothing out
    for _ in range(3):
        assert niches.determined()
        niches.ask()
    assert not niches.can_ask() and not niches.determined()


def test_lag_withholds_results_from_the_proposals_and_checkpoints_them():
    strategy = make(CASES[8])  # natural niches, lag 2: seeds always count
    seeds = [strategy.ask() for _ in range(3)]
    for proposal in seeds:
        strategy.tell(evaluate(proposal, 1))
    assert len(strategy.archive) == 3
    children = [strategy.ask() for _ in range(3)]
    for child in children:
        strategy.tell(evaluate(child, 1))
    # child 6 is bred knowing tickets < 4: children 4 and 5 wait (the archive has three slots)
    waiting = [p.ticket for p, _ in strategy._unseen]
    assert waiting == [4, 5]
    restored = make(CASES[8])
    restored.load_state_dict(json.loads(json.dumps(strategy.state_dict())))
    assert same(one_at_a_time(restored, 6), one_at_a_time(strategy, 6))


@pytest.mark.parametrize("case", [CASES[1], CASES[7]], ids=["cmaes", "niches"])
def test_steady_state_proposals_depend_on_arrival_order(case):
    """Why the mode exists: told on arrival and asked ahead, two arrival orders give two searches."""
    n = case[5]
    first, _ = in_parallel(make(case), n, 3, 0, reproducible=False)
    second, _ = in_parallel(make(case), n, 3, 1, reproducible=False)
    assert not same(first, second)
    assert not same(first, one_at_a_time(make(case), n))


def result(ticket: int) -> Evaluation:
    return Evaluation(ticket, np.array([float(ticket)]))


def test_ticket_order_holds_results_until_every_earlier_one_is_out():
    order = TicketOrder([3, 4])
    for ticket in (5, 6, 7):
        order.asked(ticket)
    assert order.arrived(result(6)) == [] and order.arrived(result(4)) == []
    assert order.held == [4, 6]
    assert [e.ticket for e in order.arrived(result(3))] == [3, 4]
    assert [e.ticket for e in order.arrived(result(5))] == [5, 6]
    with pytest.raises(ValueError, match="ticket 7 asked after 7"):
        order.asked(7)
    with pytest.raises(ValueError, match=r"held results \[9\] are not outstanding"):
        TicketOrder([1], [result(9)])


def test_replay_rearranges_store_events_into_the_told_order():
    """A checkpoint with 1 and 2 outstanding, 2 already recorded (held); then the store records
    ask 3, result 3, result 1, ask 4, result 4: the driver told 1, 2, 3 when 1 came, then 4."""
    order = TicketOrder([1, 2], [result(2)])
    asks = {t: Proposal(t, np.zeros(1)) for t in (3, 4)}
    events = [asks[3], result(3), result(1), asks[4], result(4)]
    told = order.replay(events)
    assert [("ask" if isinstance(e, Proposal) else "tell", e.ticket) for e in told] == [
        ("ask", 3), ("tell", 1), ("tell", 2), ("tell", 3), ("ask", 4), ("tell", 4)
    ]
    assert order.held == []
    partial = TicketOrder([1, 2])
    partial.replay([result(2)])
    assert partial.held == [2]  # still waiting for 1: the resumed driver holds it


# -- whole runs: three slots finishing out of order, the driver killed ------------------------------


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory, pico_family) -> Path:
    folder = tmp_path_factory.mktemp("reproducible")
    write_runs(folder, pico_family)
    return folder


@pytest.fixture(scope="module")
def references(runs_folder) -> dict[str, tuple[list, list, dict | None]]:
    return local_runs(runs_folder)


def killed_at(step: str, n: int, argv: list[str]) -> bool:
    """The command line in a forked child whose driver dies at the n-th ``step`` (tests/driver_kill.py)."""
    import multiprocessing
    import signal

    process = multiprocessing.get_context("fork").Process(target=_killed_child, args=(step, n, argv))
    process.start()
    process.join(120)
    return process.exitcode == -signal.SIGKILL


def _killed_child(step: str, n: int, argv: list[str]) -> None:
    import sys

    import torch

    torch.set_num_threads(1)
    driver_kill.arm(step, n)
    from evomerge import cli

    sys.exit(cli.main(argv))


@pytest.mark.parametrize("name", list(RUNS))
def test_slots_finishing_out_of_order_and_a_killed_driver_give_the_local_run(name, runs_folder, references, monkeypatch):
    """Three slots completing in a scrambled order (driver_kill.OutOfOrderExecutor), then the same
    killed at several steps — with results recorded and held for an earlier ticket — and resumed."""
    monkeypatch.setattr(session_module, "build_executor", driver_kill.out_of_order(3))
    path = runs_folder / f"{name}.yaml"
    start_run(path, run_dir=runs_folder / "slots" / name, progress=False)
    assert contents(runs_folder / "slots" / name) == references[name]
    order = arrival(runs_folder / "slots" / name)
    assert order != sorted(order) or name == "optuna-tpe", "the results should arrive out of ticket order"

    run = runs_folder / "killed" / name
    argv = ["run", str(path), "--run-dir", str(run), "--quiet"]
    held = []
    for step, n in (("recorded", 3), ("dispatched", 4), ("telling", 2), ("checkpointing", 1)):
        assert killed_at(step, n, argv), f"the driver was not killed at {step} #{n}"
        held.append(held_back(run))
        argv = ["resume", str(run), "--quiet"]
    resume_run(run, progress=False)
    assert contents(run) == references[name]
    assert any(held) or name == "optuna-tpe", "no kill left a result waiting for an earlier ticket"


def test_a_recipe_proposed_while_its_twin_is_evaluated_waits_for_the_cached_result(runs_folder, references, monkeypatch):
    """CMA-ES with a wide step on a 2-gene space clips many samples to the same corner of the box:
    identical recipes. A one-worker run serves a repeat from the cache; with three slots the repeat
    may be asked while its twin is still out, and then waits for that result instead of being
    evaluated a second time (which would record it as evaluated, not cached)."""
    import yaml

    data = yaml.safe_load((runs_folder / "cmaes.yaml").read_text())
    data["name"] = "corners"
    data["search_space"] = {"kind": "parameter", "method": "task_arithmetic", "layer_granularity": 0,
                            "fixed_model": {"weight": 1.0}, "shared_genes": {"lambda": {"low": 0.0, "high": 2.0}}}
    data["strategy"]["settings"] = {"sigma0": 1.0, "popsize": 6, "x0": [0.0, 0.0]}
    (runs_folder / "corners.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    start_run(runs_folder / "corners.yaml", run_dir=runs_folder / "local" / "corners", progress=False)
    monkeypatch.setattr(session_module, "build_executor", driver_kill.out_of_order(3))
    start_run(runs_folder / "corners.yaml", run_dir=runs_folder / "slots" / "corners", progress=False)
    local = contents(runs_folder / "local" / "corners")
    assert contents(runs_folder / "slots" / "corners") == local
    with RunStore.open_reader(runs_folder / "slots" / "corners") as store:
        asked = {c.ticket: c.seq for c in store.candidates()}
        recorded = {r.ticket: r.seq for r in store.results()}
        cached = [(r.ticket, r.cached_from) for r in store.results() if r.cached_from is not None]
    assert any(asked[ticket] < recorded[twin] for ticket, twin in cached), "no repeat was asked while its twin was out"
