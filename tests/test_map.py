"""MAP and the corners: quadratic surrogates (exact on quadratics, sigmoid link on bounded data), the
numpy NSGA-III front against brute force, references evaluated first by every multi-objective
strategy, MAP's batches (independent of result arrival order, exact checkpoints), configuration
errors, and a MAP run end to end on pico models: front, report, export --pick."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge import cli
from evomerge.errors import ConfigError
from evomerge.inspection import RunView, hypervolume, pareto_front
from evomerge.inspection.export_candidate import pick_candidate
from evomerge.inspection.front import reference_points
from evomerge.inspection.report import write_report
from evomerge.recipe import recipe_from_dict
from evomerge.run import start_run
from evomerge.search import Evaluation, Proposal, Strategy, build_strategy
from evomerge.search.layout import GenomeLayout, Reference
from evomerge.search.map_surrogate import angles, bin_of, directions, ray_length
from evomerge.search.nsga import dominance_ranks, nsga3, reference_directions
from evomerge.search.surrogate import fit_quadratic, link_for, n_coefficients, quadratic_features, r_squared, sigmoid

REPO = Path(__file__).resolve().parents[1]
GLOBAL_SPACE = REPO / "search_spaces" / "task-arithmetic-global.yaml"


def _layout(d: int = 3) -> GenomeLayout:
    """A box whose corners are references: each gene alone at 1 (a source), the origin, the centre."""
    refs = [Reference(f"s{i}", "source", np.eye(d)[i]) for i in range(d)]
    refs += [Reference("base", "base", np.zeros(d)), Reference("uniform", "uniform", np.full(d, 1.0 / d))]
    return GenomeLayout.box(d, None, refs)


def _scores(x: np.ndarray, m: int = 2) -> np.ndarray:
    """Bounded, conflicting objectives: objective k peaks near gene k at 0.8."""
    d = len(x)
    return np.array([float(sigmoid(np.array([2.0 - 6.0 * np.sum((x - 0.8 * np.eye(d)[k % d]) ** 2)]))[0]) for k in range(m)])


# --- the surrogate -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "diagonal"])
def test_a_quadratic_fitted_on_a_true_quadratic_is_exact(kind):
    rng = np.random.default_rng(1)
    d = 4
    p = n_coefficients(d, kind)
    assert p == (15 if kind == "full" else 9) and quadratic_features(rng.random((5, d)), kind).shape == (5, p)
    truth = rng.normal(size=p)
    x = rng.random((p + 3, d))
    y = quadratic_features(x, kind) @ truth
    model = fit_quadratic(x, y, kind=kind)
    assert np.allclose(model.coefficients, truth, atol=1e-9)
    new = rng.random((50, d))
    assert np.allclose(model.predict(new), quadratic_features(new, kind) @ truth, atol=1e-9)
    assert r_squared(quadratic_features(new, kind) @ truth, model.predict(new)) == pytest.approx(1.0, abs=1e-12)


def test_the_feature_order_is_squares_cross_terms_linear_constant():
    x = np.array([[2.0, 3.0, 5.0]])
    assert quadratic_features(x).tolist() == [[4.0, 9.0, 25.0, 6.0, 10.0, 15.0, 2.0, 3.0, 5.0, 1.0]]
    assert quadratic_features(x, "diagonal").tolist() == [[4.0, 9.0, 25.0, 2.0, 3.0, 5.0, 1.0]]


def test_the_sigmoid_link_fits_bounded_data_that_a_plain_quadratic_cannot():
    rng = np.random.default_rng(2)
    truth = np.array([-8.0, -6.0, 3.0, 4.0, 2.0, -1.0])  # saturates near 0 at the far corner and near 1 in the middle
    x = rng.random((40, 2))
    y = sigmoid(quadratic_features(x) @ truth)
    assert link_for(y) == ("sigmoid", 0.0, 1.0)
    model = fit_quadratic(x, y, link="sigmoid")
    assert np.allclose(model.coefficients, truth, atol=1e-4)
    new = rng.random((200, 2))
    expected = sigmoid(quadratic_features(new) @ truth)
    assert np.abs(model.predict(new) - expected).max() < 1e-5
    plain = fit_quadratic(x, y)
    assert np.abs(plain.predict(new) - expected).max() > 100 * np.abs(model.predict(new) - expected).max()
    # a negated rate lies in [-1, 0]: the same link onto that range; anything else is fitted as it is
    assert link_for(-y) == ("sigmoid", -1.0, 0.0)
    negated = fit_quadratic(x, -y, link="sigmoid", low=-1.0, high=0.0)
    assert np.abs(negated.predict(new) + expected).max() < 1e-5
    assert link_for(np.array([0.2, 1.5]))[0] == "identity"
    with pytest.raises(ValueError, match=r"values must lie in \[0.0, 1.0\]"):
        fit_quadratic(x, y + 1.0, link="sigmoid")


def test_a_sigmoid_fit_of_exact_zeros_and_ones_stays_finite():
    """Exact-match scores of 0 and 1 (a source that cannot do the task) give finite coefficients."""
    x = np.random.default_rng(3).random((20, 2))
    y = (x[:, 0] > 0.5).astype(float)
    model = fit_quadratic(x, y, link="sigmoid")
    assert np.all(np.isfinite(model.coefficients))
    assert np.mean((model.predict(x) > 0.5) == (y > 0.5)) >= 0.9


# --- the surrogate front -------------------------------------------------------------------


def _brute_ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.full(len(values), -1)
    left = set(range(len(values)))
    rank = 0
    while left:
        layer = {i for i in left if not any(np.all(values[j] >= values[i]) and np.any(values[j] > values[i]) for j in left)}
        for i in layer:
            ranks[i] = rank
        left -= layer
        rank += 1
    return ranks


def _nondominated(values: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Brute force: compare every row with every other (in chunks of rows)."""
    keep = np.empty(len(values), dtype=bool)
    for start in range(0, len(values), chunk):
        rows = values[start:start + chunk]
        at_least = np.ones((len(rows), len(values)), dtype=bool)
        better = np.zeros((len(rows), len(values)), dtype=bool)
        for k in range(values.shape[1]):
            at_least &= values[None, :, k] >= rows[:, None, k]
            better |= values[None, :, k] > rows[:, None, k]
        keep[start:start + chunk] = ~(at_least & better).any(axis=1)
    return keep


def test_dominance_ranks_equal_a_brute_force_peel():
    rng = np.random.default_rng(4)
    for m in (1, 2, 3):
        values = rng.integers(0, 5, size=(40, m)).astype(float)  # many ties and duplicates
        assert dominance_ranks(values).tolist() == _brute_ranks(values).tolist()


def test_reference_directions_cover_the_simplex():
    for m, population, count in ((2, 100, 100), (3, 100, 91), (3, 20, 15)):
        w = reference_directions(m, population)
        assert w.shape == (count, m) and np.allclose(w.sum(axis=1), 1.0) and w.min() >= 0.0
        assert len(np.unique(w, axis=0)) == count


@pytest.mark.parametrize("m", [2, 3])
def test_the_surrogate_front_matches_a_brute_force_dominance_check(m):
    """NSGA-III on two/three quadratics: no point of a 101×101 grid dominates a front point (beyond a
    small tolerance), and the front's hypervolume is that of the grid's own front."""
    centres = np.array([[0.2, 0.3], [0.8, 0.4], [0.5, 0.9]])[:m]

    def f(x):
        return np.stack([1.0 - np.sum((x - c) ** 2, axis=1) for c in centres], axis=1)

    front_x, front_y = nsga3(f, 2, m, np.random.default_rng(0), population=60, generations=80)
    assert np.allclose(f(front_x), front_y) and np.all(dominance_ranks(front_y) == 0)
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 101), np.linspace(0, 1, 101)), axis=-1).reshape(-1, 2)
    values = f(grid)
    tolerance = 1e-4 if m == 2 else 1e-2  # three objectives converge more slowly (a 2-D set of optima)
    for point in front_y:
        assert not np.any(np.all(values > point + tolerance, axis=1)), "a grid point dominates a front point"
    grid_front = values[_nondominated(values)]
    worst = values.min(axis=0)
    ratio = hypervolume(front_y, worst) / hypervolume(grid_front, worst)  # 60 points against thousands
    assert ratio > (0.995 if m == 2 else 0.96), "part of the true front is missing"
    assert len(front_y) >= 50  # spread along the front, not collapsed on a few points


def test_hyperspherical_angles_and_rays_round_trip():
    rng = np.random.default_rng(5)
    x = rng.random((30, 4))
    u = directions(angles(x))
    assert np.allclose(u * np.linalg.norm(x, axis=1, keepdims=True), x)
    length = ray_length(u)
    assert np.allclose((u * length[:, None]).max(axis=1), 1.0)  # the ray leaves the box through a face
    assert bin_of(angles(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])), 4).tolist() == [0, 3, 2]


# --- references first ----------------------------------------------------------------------

MULTI = [
    ("nsga2", "optuna", {"sampler": "nsga2", "sampler_settings": {"population_size": 6}}),
    ("nsga3", "optuna", {"sampler": "nsga3", "sampler_settings": {"population_size": 6}}),
    ("tpe", "optuna", {"sampler": "tpe", "sampler_settings": {"n_startup_trials": 6}}),
    ("random", "random", {}),
    ("map", "map", {"generations": 10}),
]


def _run(strategy: Strategy, n: int, evaluate=_scores) -> list[Proposal]:
    asked = []
    for _ in range(n):
        proposal = strategy.ask()
        asked.append(proposal)
        strategy.tell(Evaluation(proposal.ticket, evaluate(proposal.genome, strategy.n_objectives)))
    return asked


@pytest.mark.parametrize(("name", "settings"), [c[1:] for c in MULTI], ids=[c[0] for c in MULTI])
def test_every_multi_objective_strategy_evaluates_the_references_first(name, settings):
    layout = _layout()
    strategy = build_strategy(name, layout, n_objectives=2, seed=3, settings=settings)
    asked = _run(strategy, 9)
    for proposal, reference in zip(asked, layout.references):
        assert proposal.info["reference"] == reference.name
        assert proposal.genome.tobytes() == reference.genome.tobytes()
    assert all("reference" not in p.info for p in asked[len(layout.references):])


def test_single_objective_strategies_start_from_the_references_only_when_asked():
    layout = _layout()
    tpe = {"sampler": "tpe", "sampler_settings": {"n_startup_trials": 4}}
    plain = _run(build_strategy("optuna", layout, seed=3, settings=tpe), 3)
    assert all("reference" not in p.info for p in plain)
    sources = _run(build_strategy("optuna", layout, seed=3, settings={**tpe, "references": ["source"]}), 4)
    assert [p.info.get("reference") for p in sources] == ["s0", "s1", "s2", None]
    none = _run(build_strategy("random", layout, n_objectives=2, seed=3, settings={"references": []}), 2)
    assert all("reference" not in p.info for p in none)


def test_references_outside_the_box_or_without_a_genome_are_skipped():
    refs = [Reference("a", "source", np.array([1.0, 0.0])), Reference("far", "source", np.array([0.0, 0.9])),
            Reference("direct", "source", None)]
    bounds = np.array([[0.0, 1.0], [0.0, 0.5]])
    strategy = build_strategy("random", GenomeLayout.box(2, None, refs), n_objectives=2, bounds=bounds)
    assert [r.name for r in strategy.start_references(None)] == ["a"]


def test_optuna_restores_exactly_after_its_enqueued_references():
    layout = _layout()
    settings = {"sampler": "nsga2", "sampler_settings": {"population_size": 6}}
    reference = build_strategy("optuna", layout, n_objectives=2, seed=3, settings=settings)
    _run(reference, 3)
    state = json.loads(json.dumps(reference.state_dict()))
    after = _run(reference, 10)
    restored = build_strategy("optuna", layout, n_objectives=2, seed=3, settings=settings)
    restored.load_state_dict(state)
    again = _run(restored, 10)
    assert [(p.ticket, p.genome.tobytes(), p.info) for p in again] == [(p.ticket, p.genome.tobytes(), p.info) for p in after]


# --- MAP's batches -------------------------------------------------------------------------

MAP_SETTINGS = {"batch_size": 4, "generations": 15, "population": 40}


def _map(seed: int = 0, d: int = 2, m: int = 2, **settings) -> Strategy:
    return build_strategy("map", _layout(d), n_objectives=m, seed=seed, settings={**MAP_SETTINGS, **settings})


def _drive(strategy: Strategy, n: int, order: int = 0, fail_every: int = 0) -> list[tuple]:
    """Keep up to 3 proposals in flight as ``can_ask`` allows; complete them in an order set by
    ``order`` (0: ask order); a candidate whose ticket is a multiple of ``fail_every`` fails."""
    log = []
    for _ in range(n):
        while len(strategy.outstanding) < 3 and strategy.can_ask():
            p = strategy.ask()
            log.append(("ask", p.ticket, p.genome.tobytes(), json.dumps(p.info, sort_keys=True)))
        chosen = min(strategy.outstanding, key=lambda p: ((p.ticket * 2654435761 * order) % 1000003, p.ticket))
        if fail_every and chosen.ticket % fail_every == 0:
            evaluation = Evaluation.failure(chosen.ticket, strategy.n_objectives)
        else:
            evaluation = Evaluation(chosen.ticket, _scores(chosen.genome, strategy.n_objectives))
        strategy.tell(evaluation)
        log.append(("tell", chosen.ticket))
    return log


def test_map_design_then_batches_of_surrogate_proposals():
    strategy = _map()
    assert strategy.coefficients == 6 and strategy.design_size == 12
    log = _drive(strategy, 24)
    infos = [json.loads(entry[3]) for entry in log if entry[0] == "ask"]
    assert [i["role"] for i in infos[:12]] == ["reference"] * 4 + ["isotropic"] * 2 + ["design"] * 6
    surrogate = infos[12:]
    assert {i["batch"] for i in surrogate} == {1, 2, 3} and {i["role"] for i in surrogate} == {"front", "acquisition"}
    for info in surrogate:
        assert len(info["predicted"]) == 2 and 2 <= len(info["front"]) <= 40 and len(info["fit_r2"]) == 2
        assert all(len(row) == 2 for row in info["front"])
    isotropic = [np.frombuffer(e[2]) for e in log if e[0] == "ask"][4:6]
    assert all(g[0] == g[1] for g in isotropic)


def test_map_proposals_verify_the_surrogate_front():
    """Front proposals sit on the surrogates' predicted front, and a good surrogate predicts them."""
    strategy = _map(batch_size=6, acquisition=0.0)
    log = _drive(strategy, 30)
    front = [(np.frombuffer(e[2]), json.loads(e[3])) for e in log if e[0] == "ask" and json.loads(e[3])["role"] == "front"]
    assert len(front) >= 12
    errors = [np.abs(np.array(info["predicted"]) - _scores(genome)).max() for genome, info in front[-6:]]
    assert np.median(errors) < 0.05
    for genome, info in front:
        predicted = np.array(info["front"])
        assert np.all(np.array(info["predicted"]) <= predicted.max(axis=0) + 1e-6)


def test_map_batches_do_not_depend_on_the_order_results_arrive_in():
    first = [e for e in _drive(_map(seed=5), 26, order=0) if e[0] == "ask"]
    second = [e for e in _drive(_map(seed=5), 26, order=1) if e[0] == "ask"]
    assert first == second
    other_seed = [e for e in _drive(_map(seed=6), 26) if e[0] == "ask"]
    assert other_seed != first


def test_map_waits_for_its_batch_before_the_next():
    strategy = _map()
    for _ in range(12):
        strategy.ask()
    assert not strategy.can_ask()
    for p in strategy.outstanding[:-1]:
        strategy.tell(Evaluation(p.ticket, _scores(p.genome)))
    assert not strategy.can_ask()
    last = strategy.outstanding[-1]
    strategy.tell(Evaluation(last.ticket, _scores(last.genome)))
    assert strategy.can_ask() and strategy.ask().info["batch"] == 1


@pytest.mark.parametrize("fail_every", [0, 5])
def test_map_checkpoints_restore_exactly(fail_every):
    """Snapshots inside the design, between batches and mid-batch (through JSON) continue identically."""
    n = 30
    reference = _map(seed=2, d=3, m=3, design_points=14)
    states, logs, done = {}, [], 0
    for point in (0, 5, 14, 17, 24):
        logs += _drive(reference, point - done, order=1, fail_every=fail_every)
        done = point
        states[point] = (json.loads(json.dumps(reference.state_dict(), allow_nan=False)), len(logs))
    logs += _drive(reference, n - done, order=1, fail_every=fail_every)
    for point, (state, at) in states.items():
        restored = _map(seed=2, d=3, m=3, design_points=14)
        restored.load_state_dict(state)
        assert _drive(restored, n - point, order=1, fail_every=fail_every) == logs[at:], f"diverged after {point}"


def test_map_replays_recorded_asks_and_tells():
    reference = _map(seed=1)
    _drive(reference, 10)
    state = json.loads(json.dumps(reference.state_dict()))
    events: list[Proposal | Evaluation] = []
    for _ in range(8):
        while reference.can_ask() and len(reference.outstanding) < 3:
            events.append(reference.ask())
        chosen = reference.outstanding[-1]
        events.append(Evaluation(chosen.ticket, _scores(chosen.genome)))
        reference.tell(events[-1])
    restored = _map(seed=1)
    restored.load_state_dict(state)
    restored.replay(events)
    assert _drive(restored, 6) == _drive(reference, 6)


def test_map_refits_after_failures_with_more_design_points():
    """Failed design points leave too few results to fit: MAP asks for more design points first."""
    strategy = _map(design_points=6)
    for _ in range(6):
        p = strategy.ask()
        strategy.tell(Evaluation.failure(p.ticket, 2) if p.ticket < 3 else Evaluation(p.ticket, _scores(p.genome)))
    extra = strategy.ask()
    assert extra.info == {"batch": 1, "role": "design"} and strategy.surrogates() is None


def test_map_proposes_inside_other_bounds():
    """Surrogates live in the unit box; proposals are mapped to the strategy's bounds and back."""
    bounds = np.array([[0.0, 2.0], [-1.0, 1.0]])
    refs = [Reference("a", "source", np.array([1.0, 0.0])), Reference("b", "source", np.array([0.0, 1.0]))]
    strategy = build_strategy("map", GenomeLayout.box(2, None, refs), n_objectives=2, bounds=bounds, settings=MAP_SETTINGS)
    asked = []
    for _ in range(20):
        p = strategy.ask()
        asked.append(p)
        unit = (p.genome - bounds[:, 0]) / (bounds[:, 1] - bounds[:, 0])
        strategy.tell(Evaluation(p.ticket, _scores(unit)))
    genomes = np.array([p.genome for p in asked])
    assert np.all((genomes >= bounds[:, 0]) & (genomes <= bounds[:, 1]))
    assert genomes[:, 1].min() < -0.5 and genomes[:, 0].max() > 1.5  # the whole box, not only [0, 1]
    assert [p.info.get("reference") for p in asked[:2]] == ["a", "b"] and asked[0].genome.tolist() == [1.0, 0.0]


def test_map_on_more_genes_than_bins_uses_front_points_only():
    strategy = _map(d=7, design_points=40, batch_size=3)
    log = _drive(strategy, 43)
    roles = {json.loads(e[3])["role"] for e in log if e[0] == "ask" and json.loads(e[3])["batch"] > 0}
    assert roles == {"front"}


@pytest.mark.parametrize(
    ("d", "settings", "budget", "message"),
    [
        (26, {}, 120, r"strategy map: a full quadratic in 26 genes has 378 coefficients \(\(d\+1\)\(d\+2\)/2\) but the budget "
         r"is 120 evaluations; use a space with fewer genes \(search_spaces/task-arithmetic-global.yaml\); or quadratic: "
         r"diagonal \(53 coefficients\)"),
        (26, {"quadratic": "diagonal"}, 40, r"a diagonal quadratic in 26 genes has 53 coefficients \(2d\+1\) but the budget is 40"),
        (3, {}, 15, r"the design of 20 points \(2 per coefficient of a full quadratic in 3 genes\) exceeds the budget of 15 "
         r"evaluations; set strategy.settings.design_points between 10 and 15"),
        (3, {"design_points": 8}, None, r"design_points: 8 points cannot fit the 10 coefficients"),
        (2, {"radius": [0.5, 0.2]}, None, r"radius: expected 0 <= low < high <= 1"),
        (2, {"batch": 3}, None, r"strategy.settings: batch: unknown key \(did you mean 'batch_size'\?\)"),
        (2, {"references": ["sources"]}, None, r"strategy.settings: references\[0\]: Input should be 'source', 'base' or 'uniform'"),
    ],
)
def test_map_configuration_errors_are_one_line(d, settings, budget, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_strategy("map", _layout(d), n_objectives=2, settings=settings, budget=budget)
    assert "\n" not in str(info.value)


def test_an_explicit_sigmoid_link_refuses_unbounded_objectives():
    strategy = _map(link="sigmoid", design_points=6)
    for _ in range(6):
        p = strategy.ask()
        strategy.tell(Evaluation(p.ticket, 3.0 * _scores(p.genome)))
    with pytest.raises(ConfigError, match=r"strategy.settings.link: objective 0 has values outside \[0, 1\] and \[-1, 0\]"):
        strategy.ask()


# --- a MAP run end to end ------------------------------------------------------------------

FITNESS = """
def _features(model):
    layers = model.model.layers
    return float(layers[0].mlp.up_proj.weight.detach().double().sum()), float(model.lm_head.weight.detach().double().sum())

def two(model, tokenizer):
    x, h = _features(model)
    return {"left": -(x + 2.45) ** 2, "right": -(h - 0.40) ** 2}
"""


@pytest.fixture
def map_run(tmp_path, pico_family) -> Path:
    (tmp_path / "fitness.py").write_text(FITNESS)
    data = {
        "name": "map-run",
        "seed": 0,
        "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])},
        "base": "base",
        "search_space": str(GLOBAL_SPACE),
        "strategy": {"name": "map", "settings": {"batch_size": 4, "generations": 30}},
        "objectives": ["left", "right"],
        "fitness": {"python": "fitness.py:two"},
        "budget": {"evaluations": 20},
    }
    (tmp_path / "map.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    start_run(tmp_path / "map.yaml", run_dir=tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_a_map_run_front_includes_or_dominates_every_source_and_the_report_draws_the_prediction(map_run, capsys):
    view = RunView.load(map_run)
    assert view.state == "finished" and len(view.ok_results()) == 20
    assert view.references() == {"a": 0, "b": 1, "base": 2, "uniform": 3}
    front = pareto_front(view)
    values = {m.candidate: np.array(list(m.objectives.values())) for m in front}
    for point in reference_points(view, front=front):
        own = np.array(list(point.objectives.values()))
        if point.dominated_by is None:
            assert point.candidate in values
        else:
            assert np.all(values[point.dominated_by] >= own) and np.any(values[point.dominated_by] > own)
    assert cli.main(["front", str(map_run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data["references"]] == ["a", "b", "base", "uniform"]
    assert cli.main(["front", str(map_run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("references: a #0 ")

    page = write_report(map_run).read_text()
    assert "<h2>Surrogate front</h2>" in page and "Reference models evaluated by the search" in page
    assert (map_run / "report" / "surrogate.png").read_bytes()[:4] == b"\x89PNG"
    last = max((c for c in view.candidates.values() if "front" in c.proposal.info), key=lambda c: c.ticket)
    assert f"batch {last.proposal.info['batch']})" in page


def test_export_pick_on_a_map_run_gives_the_member_asked_for(map_run, tmp_path, capsys):
    view = RunView.load(map_run)
    front = pareto_front(view)
    assert len(front) >= 3
    values = np.array([[m.objectives["left"], m.objectives["right"]] for m in front])
    scaled = (values - values.min(axis=0)) / np.ptp(values, axis=0)
    for weights in ((0.7, 0.3), (0.0, 1.0), (1.0, 0.0)):
        expected = front[int(np.argmax(scaled @ np.array(weights)))].candidate
        assert pick_candidate(view, {"left": weights[0], "right": weights[1]}) == expected
    expected = front[int(np.argmax(scaled @ np.array([0.7, 0.3])))].candidate
    out = tmp_path / "picked"
    assert cli.main(["export", str(map_run), "--pick", "left=0.7,right=0.3", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote candidate {expected} to {out}")
    exported = recipe_from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))
    assert exported == recipe_from_dict(view.recipe(expected))
    assert "strategy `map`" in (out / "README.md").read_text()
