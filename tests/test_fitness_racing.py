"""Racing: the bounds, the stop rule, a raced lm-eval evaluation, and a raced search end to end.

The bounds are checked by simulation (their miss rate at the stated confidence); the fitness on a
random-init pico Llama and tiny tasks (a complete race must equal the unraced evaluation, a stopped
one must have scored only its first chunk); the search on a pico family with a task whose answers
are the base model's own greedy outputs, so the all-zero genome (the base itself) scores 100 % and
a far-off genome far less: the far-off candidates are stopped after one chunk.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import evomerge.fitness.lm_eval_fitness as lm_eval_fitness
from evomerge import cli
from evomerge.errors import ConfigError
from evomerge.fitness import AGGREGATE, LmEvalFitness
from evomerge.fitness.lm import ResidentLM
from evomerge.fitness.racing import (
    Bar,
    Estimate,
    Incumbents,
    race_order,
    score_bounds,
    z_value,
)
from evomerge.inspection import RunView, pareto_front
from evomerge.inspection.report import write_report
from evomerge.run import start_run
from evomerge.search import STRATEGIES, Proposal, Strategy, register_strategy
from evomerge.status import run_status
from evomerge.store import RunStore

DATA = Path(__file__).parent / "data" / "fitness"
REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"

# -- the bounds and the stop rule ------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.02, 0.1, 0.3, 0.5, 0.8, 0.97])
@pytest.mark.parametrize("n", [10, 25, 60])
def test_bounds_hold_at_their_confidence(p, n):
    """Over many fixed evaluation sets and seeded orders, the full-set mean leaves the one-sided
    bounds at most as often as 1 - confidence allows (sampling-noise slack: 3 standard errors)."""
    rng = random.Random(f"{p}:{n}")
    total, trials, z = 100, 600, z_value(0.95, 1)
    above = below = 0
    for _ in range(trials):
        population = [float(rng.random() < p) for _ in range(total)]
        seen = rng.sample(population, n)
        low, high = score_bounds(seen, total, z)
        truth = sum(population) / total
        above += truth > high + 1e-12
        below += truth < low - 1e-12
    slack = 3 * math.sqrt(0.05 * 0.95 / trials)
    assert above / trials <= 0.05 + slack and below / trials <= 0.05 + slack


def test_bounds_are_exact_when_everything_is_scored_and_wide_when_nothing_is():
    z = z_value(0.95, 1)
    assert score_bounds([1.0, 0.0, 1.0, 1.0], 4, z) == (0.75, 0.75)
    assert score_bounds([], 10, z) == (0.0, 1.0)
    low, high = score_bounds([0.0] * 25, 100, z)  # no correct answer yet: still room above 0
    assert low == 0.0 and 0.05 < high < 0.15
    low, high = score_bounds([2.0, 0.0], 10, z)  # a score outside [0, 1] widens the range
    assert high > 1.0
    narrow = score_bounds([1.0] * 10 + [0.0] * 15, 100, z)
    wide = score_bounds([1.0] * 10 + [0.0] * 15, 100, z_value(0.95, 3))  # Bonferroni over 3 tasks
    assert wide[1] > narrow[1] > 0.4
    uneven = score_bounds([1.0, 0.0], 4, z, weights=[0.5, 0.1])  # a group averaging unequal tasks
    assert 0.0 < uneven[0] < uneven[1] < 1.0


def test_bar_and_incumbents():
    incumbent = Bar(("fitness",), ((0.5,),))
    assert incumbent.out_of_reach([0.49]) and not incumbent.out_of_reach([0.5]) and not incumbent.out_of_reach([0.7])
    front = Incumbents(("a", "b"))
    assert front.bar() is None
    for point in ([0.2, 0.9], [0.6, 0.6], [0.5, 0.5], [0.9, 0.1], [0.6, 0.6]):
        front.add(point)
    bar = front.bar()
    assert sorted(bar.front) == [(0.2, 0.9), (0.6, 0.6), (0.9, 0.1)]  # (0.5, 0.5) is dominated
    assert bar.out_of_reach([0.55, 0.6]) and bar.out_of_reach([0.1, 0.9])
    assert not bar.out_of_reach([0.3, 0.8]) and not bar.out_of_reach([0.6, 0.6]) and not bar.out_of_reach([1.0, 0.0])


def test_race_order_is_a_fixed_seeded_permutation():
    assert race_order(50, 3) == race_order(50, 3) != race_order(50, 4)
    assert sorted(race_order(50, 3)) == list(range(50)) and race_order(50, 3) != list(range(50))


# -- a raced lm-eval evaluation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(make_pico):
    folder = make_pico(arch="llama", seed=0)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """How many requests each lm-eval evaluation sent to the model."""
    counts: list[int] = []
    original = lm_eval_fitness.lm_eval_evaluate

    def spy(**kwargs):
        output = original(**kwargs)
        counts.append(sum(len(t.instances) for t in kwargs["task_dict"]["tasks"].values()))
        return output

    monkeypatch.setattr(lm_eval_fitness, "lm_eval_evaluate", spy)
    return counts


@pytest.fixture
def asked(monkeypatch) -> list[int]:
    """Requests that reached the model (a replayed response is not asked again)."""
    sizes: list[int] = []
    original = ResidentLM.loglikelihood

    def spy(self, requests, disable_tqdm=True):
        sizes.append(len(requests))
        return original(self, requests, disable_tqdm)

    monkeypatch.setattr(ResidentLM, "loglikelihood", spy)
    return sizes


SPEC = {"include_path": str(DATA), "batch_size": 8, "tasks": [{"task": "tiny_mc"}, {"task": "tiny_custom", "weight": 2.0}]}


def test_a_race_that_cannot_stop_equals_the_full_evaluation(tiny, calls, asked):
    model, tokenizer = tiny
    full = LmEvalFitness(SPEC).evaluate(model, tokenizer)
    assert calls == [12 * 4 * 2] and asked == [96]
    calls.clear(), asked.clear()
    raced = LmEvalFitness({**SPEC, "racing": {"chunk": 5}})
    result = raced.evaluate(model, tokenizer, bar=Bar((AGGREGATE,), ((-1.0,),)))  # any candidate can beat -1
    assert result.estimate is None
    assert result.objectives == full.objectives and result.per_example == full.per_example
    assert result.n_examples == full.n_examples == {"tiny_mc": 12, "tiny_custom": 12}
    assert len(calls) == math.ceil(24 / 5) + 1 and sum(calls[:-1]) == calls[-1] == 96  # chunks, then the replay
    assert sum(asked) == 96  # the replay asked the model nothing: every response came from memory
    assert raced.describe()["racing"] == {"chunk": 5, "confidence": 0.95}
    assert raced.spec_hash() != LmEvalFitness(SPEC).spec_hash()


def test_a_hopeless_candidate_stops_after_its_first_chunk(tiny, calls, asked):
    model, tokenizer = tiny
    full = LmEvalFitness(SPEC).evaluate(model, tokenizer)
    asked.clear()
    raced = LmEvalFitness({**SPEC, "racing": {"chunk": 6}})
    result = raced.evaluate(model, tokenizer, bar=Bar((AGGREGATE,), ((1.0,),)))  # nobody beats a perfect score
    assert result.estimate == Estimate(6, 24) and sum(asked) == 6 * 4
    scored = {name: [i for i, s in zip(ex.doc_ids, ex.scores) if not math.isnan(s)] for name, ex in result.per_example.items()}
    assert sum(len(ids) for ids in scored.values()) == 6 and result.n_examples == {k: len(v) for k, v in scored.items()}
    for name, ids in scored.items():
        truth = full.per_example[name].as_dict()
        assert [result.per_example[name].as_dict()[i] for i in ids] == [truth[i] for i in ids]
        if ids:
            assert result.objectives[name] == pytest.approx(sum(truth[i] for i in ids) / len(ids))
    again = raced.evaluate(model, tokenizer, bar=Bar((AGGREGATE,), ((1.0,),)))
    assert repr(again.per_example) == repr(result.per_example)  # the same examples for every candidate (NaN != NaN)


def test_a_task_objective_and_a_front(tiny):
    model, tokenizer = tiny
    raced = LmEvalFitness({**SPEC, "racing": {"chunk": 6}})
    out = raced.evaluate(model, tokenizer, bar=Bar(("tiny_mc", "tiny_custom"), ((1.0, 1.0),)))
    assert out.estimate is not None
    kept = raced.evaluate(model, tokenizer, bar=Bar(("tiny_mc", "tiny_custom"), ((1.0, 0.0), (0.0, 1.0))))
    assert kept.estimate is None  # neither front point is out of reach of what 6 examples allow


def test_racing_needs_mean_metrics(tiny):
    with pytest.raises(ConfigError, match="fitness.racing: task 'tiny_ppl' aggregates 'word_perplexity' by"):
        LmEvalFitness({**SPEC, "tasks": [{"task": "tiny_ppl"}], "racing": {}})


# -- a raced search --------------------------------------------------------------------------------

GOOD, BAD = [0.0] * 6, [2.0] * 6  # the base itself; every expert's task vector doubled


@pytest.fixture
def base_task(tmp_path, pico_family) -> Path:
    """A one-token generation task whose answers are the base model's own greedy outputs."""
    model = AutoModelForCausalLM.from_pretrained(pico_family["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(pico_family["base"])
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = []
    for a in range(10):
        for b in range(10):
            with torch.no_grad():
                ids = tokenizer(f"{a} plus {b} is")["input_ids"]
                top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if top not in tokenizer.all_special_ids:  # a special token would end the generation empty
                rows.append({"a": a, "b": b, "answer": tokenizer.decode([top])})
    random.Random(0).shuffle(rows)
    assert len(rows) >= 52
    for split, chosen in (("validation", rows[:40]), ("test", rows[40:52])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    task = yaml.safe_load((DATA / "tiny_gen.yaml").read_text())
    task.update(task="base_gen", dataset_kwargs={"data_files": {"validation": "validation.jsonl", "test": "test.jsonl"}})
    (folder / "base_gen.yaml").write_text(yaml.safe_dump(task))
    return folder


@pytest.fixture
def good_then_bad():
    class GoodThenBad(Strategy):
        """The base first, then far-off genomes, the base again at ticket 4 (a fitness-cache hit)."""

        def _propose(self, ticket: int) -> Proposal:
            genome = GOOD if ticket in (0, 4) else [2.0 - 0.1 * ticket] * 6
            return Proposal(ticket, np.array(genome, dtype=np.float64))

        def _observe(self, proposal, evaluation) -> None:
            self.told = getattr(self, "told", []) + [(proposal.ticket, evaluation.objectives.tolist())]

        def _state(self) -> dict:
            return {}

        def _load(self, state: dict) -> None:
            """Nothing to restore."""

    register_strategy("good_then_bad")(GoodThenBad)
    yield
    STRATEGIES.pop("good_then_bad")


def test_a_raced_search_stops_hopeless_candidates_and_says_so(
    tmp_path, pico_family, base_task, good_then_bad, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "200")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {
                "name": "raced",
                "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])},
                "base": "base",
                "search_space": str(SPACE),
                "strategy": {"name": "good_then_bad"},
                "fitness": {"include_path": "tasks", "batch_size": 8, "tasks": [{"task": "base_gen"}], "racing": {"chunk": 8}},
                "heldout": True,
                "budget": {"evaluations": 6},
            }
        )
    )
    run = tmp_path / "run"
    summary = start_run(experiment, run_dir=run, progress=False)
    with RunStore.open_reader(run) as store:
        results = store.results()
    assert [r.ticket for r in results] == list(range(6))
    first, cached = results[0], results[4]
    assert first.estimate is None and first.evaluation.objectives.tolist() == [1.0]  # the base: every answer its own
    assert cached.cached_from == 0 and cached.estimate is None
    stopped = [r for r in results if r.estimate is not None]
    assert {r.ticket for r in stopped} == {1, 2, 3, 5}
    for record in stopped:
        assert record.estimate == Estimate(8, 40) and record.ok and not record.complete
        scores = record.evaluation.per_example
        assert np.isnan(scores).sum() == 32 and record.evaluation.objectives[0] == pytest.approx(np.nanmean(scores))
        assert record.evaluation.objectives[0] < 1.0
    assert summary["best"]["candidate"] == 0

    status = run_status(run)
    assert status["best"]["candidate"] == 0
    assert status["racing"] == {
        "stopped": 4, "evaluated": 5, "examples_scored": 5 * 40 - 4 * 32, "examples_saved": 128, "examples_full": 200
    }
    assert [m.candidate for m in pareto_front(run)] == [0]
    assert [r.ticket for r in RunView.load(run).estimates()] == [1, 2, 3, 5]
    assert cli.main(["status", str(run)]) == 0
    assert "racing: 4 of 5 candidates stopped early (estimates, never best); examples saved 128 of 200 (64%)" in capsys.readouterr().out
    assert cli.main(["front", str(run)]) == 0
    assert "1 non-dominated of 2 successful candidates; 4 more stopped early by racing" in capsys.readouterr().out
    assert cli.main(["export", str(run), "--candidate", "1", "--out", str(tmp_path / "out")]) == 2
    assert "candidate 1 was stopped early by racing (8 of 40 examples scored)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    page = write_report(run).read_text()
    assert "stopped early by racing</td><td>4 candidates (estimates, left out below); 128 examples saved" in page


def test_racing_refuses_a_strategy_that_scores_example_by_example(tmp_path, pico_family, base_task):
    from evomerge.experiment import load_experiment
    from evomerge.run import prepare

    data = {
        "name": "niches",
        "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"])},
        "base": "base",
        "search_space": {"kind": "split_point"},
        "strategy": {"name": "natural_niches"},
        "fitness": {"include_path": "tasks", "tasks": [{"task": "base_gen"}], "racing": {}},
        "budget": {"evaluations": 4},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="fitness.racing: strategy natural_niches compares candidates example by"):
        prepare(load_experiment(tmp_path / "exp.yaml"))
