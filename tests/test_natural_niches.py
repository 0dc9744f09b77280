"""Natural niches (M2N2): resource sharing, attraction, replacement and ablations checked against
hand-computed values; seeding, asynchronous asks, exact checkpoints; split-point SLERP children
checked element by element against a flat-vector reference, across generations; blends exported
bit-identically to what the resident merger scored."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.materialize import ResidentMerger, export_merge
from evomerge.pool import ModelPool
from evomerge.recipe import Blend, load_recipe
from evomerge.search import Evaluation, build_strategy
from evomerge.search.layout import GenomeLayout, Reference
from evomerge.search.natural_niches import (
    parent_a_probabilities,
    parent_b_probabilities,
    shared_fitness,
)
from evomerge.spaces import PoolInfo, build_space
from evomerge.spaces.split_point import SplitPointSpace

# Three members, four examples: member 0 solves {0, 1}, member 1 {0, 2}, member 2 {2, 3}.
S = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=float)
IDS = ("t:0", "t:1", "t:2", "t:3")


def test_shared_fitness_by_hand():
    # z = (2, 1, 2, 1): example 0 and 2 are shared by two members, 1 and 3 are niches.
    fitness, shared = shared_fitness(S, alpha=1.0)
    assert fitness.tolist() == [1.5, 1.0, 1.5]
    assert shared[0].tolist() == [0.5, 1.0, 0.0, 0.0]
    assert shared_fitness(S, alpha=0.0)[0].tolist() == [2.0, 2.0, 2.0]  # no competition: raw counts
    assert shared_fitness(S, alpha=2.0)[0].tolist() == [1.25, 0.5, 1.25]  # z² = (4, 1, 4, 1)
    unsolved = np.array([[0.0, 1.0], [0.0, 0.0]])
    assert shared_fitness(unsolved, 1.0)[0].tolist() == [1.0, 0.0]  # an unsolved example divides by 1


def test_parent_probabilities_by_hand():
    fitness, shared = shared_fitness(S, 1.0)
    assert parent_a_probabilities(fitness).tolist() == [0.375, 0.25, 0.375]
    # A = 1 lacks examples 1 (member 0 alone: 1.0) and 3 (member 2 alone: 1.0).
    assert parent_b_probabilities(shared, 1).tolist() == [0.5, 0.0, 0.5]
    # A = 0: member 1 adds 0.5 on example 2; member 2 adds 0.5 + 1.0 on examples 2 and 3.
    assert parent_b_probabilities(shared, 0).tolist() == [0.0, 0.25, 0.75]
    # Nobody solves anything A lacks: uniform over the others (the reference code divides by zero).
    same = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert parent_b_probabilities(shared_fitness(same, 1.0)[1], 0).tolist() == [0.0, 0.5, 0.5]
    assert parent_a_probabilities(np.zeros(4)).tolist() == [0.25] * 4


def layout(n_seeds: int = 3) -> GenomeLayout:
    return GenomeLayout.box(2, ["split", "ratio"], [Reference(f"m{i}", "source") for i in range(n_seeds)])


def scored(ticket: int, scores, ids=IDS) -> Evaluation:
    scores = np.asarray(scores, dtype=float)
    return Evaluation(ticket, np.array([scores.mean()]), per_example=scores, example_ids=ids)


def seeded(rows=S, **settings):
    """A strategy whose archive holds one member per row (asked and told as the seeds)."""
    strategy = build_strategy("natural_niches", layout(len(rows)), seed=3, settings={"archive_size": len(rows), **settings})
    for row in rows:
        proposal = strategy.ask()
        strategy.tell(scored(proposal.ticket, row))
    return strategy


def test_seeds_come_first_then_children_of_archive_members():
    strategy = build_strategy("natural_niches", layout(), seed=0)
    seeds = [strategy.ask() for _ in range(3)]
    assert [p.info for p in seeds] == [{"reference": "m0"}, {"reference": "m1"}, {"reference": "m2"}]
    assert all(p.genome is None and p.parents == () for p in seeds)
    assert not strategy.can_ask()  # no member yet: the driver waits for results
    strategy.tell(scored(0, S[0]))
    assert not strategy.can_ask()  # one member cannot mate
    strategy.tell(scored(1, S[1]))
    assert strategy.can_ask()  # asks ahead while seed 2 is still out
    child = strategy.ask()
    assert set(child.parents) <= {0, 1} and len(child.parents) == 2 and child.genome.shape == (2,)


def test_all_seeds_failed_is_a_one_line_error():
    strategy = build_strategy("natural_niches", layout(2), seed=0)
    for _ in range(2):
        strategy.tell(Evaluation.failure(strategy.ask().ticket, 1))
    with pytest.raises(ConfigError, match="only 0 seed model"):
        strategy.ask()


def test_parent_draws_follow_fitness_and_attraction():
    strategy = seeded()
    pairs = [strategy.ask().parents for _ in range(4000)]
    a = np.bincount([p[0] for p in pairs], minlength=3) / len(pairs)
    assert np.allclose(a, [0.375, 0.25, 0.375], atol=0.03)
    b_given_1 = np.bincount([p[1] for p in pairs if p[0] == 1], minlength=3)
    assert b_given_1[1] == 0 and abs(b_given_1[0] / b_given_1.sum() - 0.5) < 0.06


def test_replacement_rule():
    strategy = seeded()
    child = strategy.ask()
    strategy.tell(scored(child.ticket, [0, 0, 0, 0]))  # worst of archive ∪ {child}: dropped
    assert [t for t, _ in strategy.archive] == [0, 1, 2]
    child = strategy.ask()
    strategy.tell(scored(child.ticket, [0, 1, 0, 0]))  # copies member 0's niche: f = 0.5, the worst
    assert [t for t, _ in strategy.archive] == [0, 1, 2]
    child = strategy.ask()
    # z = (3, 2, 3, 2): f = (0.83, 0.67, 0.83, child 1.67): member 1 (ticket 1) is replaced
    strategy.tell(scored(child.ticket, [1, 1, 1, 1]))
    assert [t for t, _ in strategy.archive] == [0, child.ticket, 2]
    failed = strategy.ask()
    strategy.tell(Evaluation.failure(failed.ticket, 1))  # a failed child never enters
    assert [t for t, _ in strategy.archive] == [0, child.ticket, 2]


def test_archive_fills_before_competition():
    strategy = seeded(rows=S[:2], archive_size=3)
    child = strategy.ask()
    strategy.tell(scored(child.ticket, [0, 0, 0, 0]))  # room left: even a useless child enters
    assert [t for t, _ in strategy.archive] == [0, 1, child.ticket]


def test_ablation_switches():
    no_split = seeded(split_point=False)
    assert all(no_split.ask().genome[0] == 1.0 for _ in range(20))  # one ratio over the whole vector
    no_cross = seeded(crossover=False)
    child = no_cross.ask()
    assert len(child.parents) == 1 and child.genome is None
    ga = seeded(attraction=False, alpha=0.0)  # both parents ∝ raw fitness, with replacement
    pairs = [ga.ask().parents for _ in range(3000)]
    assert sum(a == b for a, b in pairs) / len(pairs) == pytest.approx(1 / 3, abs=0.03)
    with pytest.raises(ConfigError, match="seeds: unknown kind"):
        build_strategy("natural_niches", layout(), settings={"seeds": ["sorce"]})
    with pytest.raises(ConfigError, match="needs at least 2"):
        build_strategy("natural_niches", layout(1))


def test_other_examples_or_missing_scores_are_refused():
    strategy = seeded()
    child = strategy.ask()
    with pytest.raises(ConfigError, match="other examples"):
        strategy.tell(scored(child.ticket, [1, 0, 1], ids=("t:0", "t:1", "t:2")))
    strategy = build_strategy("natural_niches", layout(2), seed=0)
    with pytest.raises(ConfigError, match="per-example scores"):
        strategy.tell(Evaluation(strategy.ask().ticket, np.array([0.5])))


def drive(strategy, n: int, ahead: int = 3) -> list:
    """Keep up to ``ahead`` proposals out (as far as ``can_ask`` allows), complete them out of order."""
    log, rng = [], np.random.default_rng(0)
    for _ in range(n):
        while len(strategy.outstanding) < ahead and strategy.can_ask():
            p = strategy.ask()
            log.append(("ask", p.ticket, p.parents, None if p.genome is None else p.genome.tobytes()))
        chosen = min(strategy.outstanding, key=lambda p: (p.ticket * 2654435761) % 1000003)
        row = (np.random.default_rng(chosen.ticket).random(6) < 0.4).astype(float)
        strategy.tell(Evaluation(chosen.ticket, np.array([row.mean()]), per_example=row, example_ids=tuple(map(str, range(6)))))
        log.append(("tell", chosen.ticket, float(rng.random())))
    return log


def test_checkpoint_round_trip_and_replay_are_exact():
    make = lambda: build_strategy("natural_niches", layout(), seed=5, settings={"archive_size": 4})  # noqa: E731
    reference = make()
    first = drive(reference, 6)
    state = json.loads(json.dumps(reference.state_dict(), allow_nan=False))
    rest = drive(reference, 12)
    restored = make()
    restored.load_state_dict(state)
    assert drive(restored, 12) == rest
    assert len(first) > 6


# -- split-point crossovers of real models ---------------------------------------------------------


@pytest.fixture(scope="module")
def family(make_pico_family):
    return {name: str(path) for name, path in make_pico_family("llama", 2, seed=11).items()}


def split_space(family, interpolation="slerp") -> SplitPointSpace:
    with ModelPool.open(family, "base") as pool:
        info = PoolInfo(family, "base", pool.layer_map.num_layers, pool.parameter_order())
    return build_space({"kind": "split_point", "interpolation": interpolation}, info)  # type: ignore[return-value]


def flat_models(family) -> tuple[list[tuple[str, int]], dict[str, np.ndarray]]:
    """Every model's floating parameters laid end to end in canonical order, in float64."""
    with ModelPool.open(family, "base") as pool:
        order = pool.parameter_order()
        flats = {m: np.concatenate([pool.tensor(m, name).double().reshape(-1).numpy() for name, _ in order]) for m in family}
    return list(order), flats


def reference_crossover(x: np.ndarray, y: np.ndarray, split: int, w: float, slerp: bool) -> np.ndarray:
    """M2N2's crossover element by element: t = w before the split, 1 − w after; one angle overall."""
    omega = math.acos(np.clip(np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y)), -1, 1))
    out = np.empty_like(x)
    for p in range(x.size):
        t = w if p < split else 1.0 - w
        if slerp and math.sin(omega) > 1e-6:
            out[p] = math.sin((1 - t) * omega) / math.sin(omega) * x[p] + math.sin(t * omega) / math.sin(omega) * y[p]
        else:
            out[p] = (1 - t) * x[p] + t * y[p]
    return out


def materialized(family, blend: Blend) -> np.ndarray:
    with ModelPool.open(family, "base") as pool:
        merger = ResidentMerger.load(pool)
        merger.apply(blend)
        params = dict(merger.model.named_parameters())
        return np.concatenate([params[name].detach().double().reshape(-1).numpy() for name, _ in pool.parameter_order()])


@pytest.mark.parametrize("interpolation", ["slerp", "lerp"])
def test_split_point_children_match_the_element_by_element_reference(family, interpolation):
    space = split_space(family, interpolation)
    order, flats = flat_models(family)
    size = sum(n for _, n in order)
    x, y = flats["expert_1"], flats["expert_2"]
    a, b = space.reference("expert_1"), space.reference("expert_2")
    # a split inside the third tensor; the child is a blend of three segments at most
    cut = order[0][1] + order[1][1] + 5
    genome = np.array([(cut + 0.5) / size, 0.3])
    child = space.derive(genome, [a, b])
    assert [s.start for s in child.segments] == [0, cut]
    expected = reference_crossover(x, y, cut, 0.3, interpolation == "slerp")
    got = materialized(family, child)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-6)
    # a grandchild composes exactly: crossover of the child with the base, another cut
    cut2 = size // 2 + 3
    grandchild = space.derive(np.array([(cut2 + 0.5) / size, 0.8]), [child, space.reference("base")])
    expected2 = reference_crossover(expected, flats["base"], cut2, 0.8, interpolation == "slerp")
    assert np.allclose(materialized(family, grandchild), expected2, rtol=1e-5, atol=1e-6)
    assert len(grandchild.segments) == 3


def test_one_parent_is_a_copy_and_genomes_alone_are_refused(family):
    space = split_space(family)
    a = space.reference("expert_1")
    assert space.derive(None, [a]) == a
    with pytest.raises(ConfigError, match="use a strategy that breeds"):
        space.decode(np.array([0.5, 0.5]))
    assert [r.name for r in space.layout.references] == ["expert_1", "expert_2", "base", "uniform"]


def test_blend_export_equals_the_scored_model_and_reloads_from_recipe_yaml(family, tmp_path):
    space = split_space(family)
    order, _ = flat_models(family)
    size = sum(n for _, n in order)
    child = space.derive(np.array([0.37, 0.61]), [space.reference("expert_1"), space.reference("uniform")])
    folder = export_merge(child, tmp_path / "child", progress=False)
    with ModelPool.open(family, "base") as pool:
        merger = ResidentMerger.load(pool)
        merger.apply(child)
        resident = {n: p.detach().clone() for n, p in merger.model.named_parameters()}
    from safetensors.torch import load_file

    written = {}
    for shard in folder.glob("*.safetensors"):
        written.update(load_file(shard))
    for name, _ in order:
        assert torch.equal(written[name], resident[name]), name
    again = load_recipe(folder / "recipe.yaml")
    assert again == child and again.size == size


# -- the whole loop: run, kill, resume, export -----------------------------------------------------

NICHE_FITNESS = """
import os
import signal


def niches(model, tokenizer):
    # 8 examples: example j is solved when row j of the head sums above the pico family's midpoint
    calls = int(os.environ.get("NN_TEST_CALLS", "0")) + 1
    os.environ["NN_TEST_CALLS"] = str(calls)
    if calls == int(os.environ.get("NN_TEST_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    rows = model.lm_head.weight.detach().double()[:8].sum(dim=1)
    scores = [float(v > t) for v, t in zip(rows.tolist(), THRESHOLDS)]
    return {"solved": sum(scores) / len(scores)}, {"solved": scores}
"""


@pytest.fixture
def niche_experiment(tmp_path, family, monkeypatch):
    """An experiment breeding the pico family with a per-example fitness whose niches differ by source."""
    import yaml

    with ModelPool.open(family, "base") as pool:
        heads = [pool.tensor(m, "lm_head.weight").double()[:8].sum(dim=1) for m in ("expert_1", "expert_2")]
    thresholds = ((heads[0] + heads[1]) / 2).tolist()  # each source solves the rows where it is the larger
    (tmp_path / "niche_fitness.py").write_text(f"THRESHOLDS = {thresholds!r}\n" + NICHE_FITNESS)
    monkeypatch.setenv("NN_TEST_CALLS", "0")
    monkeypatch.delenv("NN_TEST_KILL_AT", raising=False)
    data = {
        "name": "niches",
        "seed": 2,
        "models": dict(family),
        "base": "base",
        "search_space": {"kind": "split_point"},
        "strategy": {"name": "natural_niches", "settings": {"archive_size": 4}},
        "fitness": {"python": "niche_fitness.py:niches"},
        "budget": {"evaluations": 14},
        "checkpoint_every": 3,
    }
    path = tmp_path / "niches.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _child(experiment: str, run: str, resume: bool, kill_at: int) -> None:
    import os

    from evomerge.run import resume_run, start_run

    os.environ["NN_TEST_KILL_AT"] = str(kill_at)
    os.environ["NN_TEST_CALLS"] = "0"
    if resume:
        resume_run(run, progress=False)
    else:
        start_run(experiment, run_dir=run, progress=False)


def _killed(experiment, run, *, resume: bool, kill_at: int) -> bool:
    import multiprocessing
    import signal

    # spawned, not forked: a forked child deadlocks in the BLAS thread pool its parent already started
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(str(experiment), str(run), resume, kill_at))
    process.start()
    process.join(120)
    return process.exitcode == -signal.SIGKILL


def recorded(run) -> tuple[list, list]:
    from evomerge.store import RunStore

    with RunStore.open_reader(run) as store:
        candidates = [(c.ticket, c.proposal.parents, c.proposal.info, c.recipe, c.status) for c in store.candidates()]
        results = [(r.ticket, r.evaluation.objectives.tobytes(), r.evaluation.per_example.tobytes(), r.evaluation.example_ids)
                   for r in store.results()]
    return candidates, results


def test_a_niches_run_breeds_blends_resumes_exactly_and_exports(niche_experiment, tmp_path, family):
    from evomerge.cli import main
    from evomerge.run import resume_run, start_run
    from evomerge.status import run_status

    reference = tmp_path / "reference"
    start_run(niche_experiment, run_dir=reference, progress=False)
    candidates, results = recorded(reference)
    assert [c[2] for c in candidates[:2]] == [{"reference": "expert_1"}, {"reference": "expert_2"}]
    children = [c for c in candidates if c[1]]
    assert len(children) == 12 and all(c[3]["kind"] == "blend" for c in children)
    assert results[0][3] == tuple(f"solved:{i}" for i in range(8))
    status = run_status(reference)
    archive = status["archive"]
    assert len(archive["members"]) == 4 and 0 < archive["coverage"] <= 1.0
    assert {m["candidate"] for m in archive["members"]} <= {c[0] for c in candidates}

    assert main(["front", str(reference)]) == 0
    page = (reference / "report" / "index.html")
    assert main(["report", str(reference)]) == 0 and page.is_file()
    text = page.read_text()
    assert "<h2>Archive</h2>" in text and "blend weights along the parameter order" in text
    for member in archive["members"]:
        assert f"#{member['candidate']}" in text

    run = tmp_path / "killed"
    assert _killed(niche_experiment, run, resume=False, kill_at=2)  # during the second seed
    assert _killed(niche_experiment, run, resume=True, kill_at=6)  # mid-breeding, after a checkpoint
    resume_run(run, progress=False)
    assert recorded(run) == (candidates, results)

    child = children[-1][0]
    out = tmp_path / "export"
    assert main(["export", str(reference), "--candidate", str(child), "--out", str(out), "--quiet"]) == 0
    again = tmp_path / "again"
    assert main(["merge", str(out / "recipe.yaml"), "--out", str(again), "--quiet"]) == 0
    from safetensors.torch import load_file

    first = {k: v for shard in out.glob("*.safetensors") for k, v in load_file(shard).items()}
    second = {k: v for shard in again.glob("*.safetensors") for k, v in load_file(shard).items()}
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
