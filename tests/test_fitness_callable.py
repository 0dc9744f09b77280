"""CallableFitness, the result type, the weighted aggregate and the spec (no lm-eval run)."""

from __future__ import annotations

import json

import pytest

from evomerge.errors import ConfigError
from evomerge.fitness import (
    AGGREGATE,
    CallableFitness,
    ExampleScores,
    Fitness,
    FitnessResult,
    LmEvalFitness,
    parse_fitness_spec,
    weighted_fitness,
)


def sum_of_weights(model, tokenizer):
    return {"score": float(sum(model)), "size": float(len(model))}


def with_examples(model, tokenizer):
    return {"acc": 0.5, "loss": 2.0}, {"acc": [1, 0, 1, 0], "loss": {7: 1.5, 3: 2.5}}


class TestWeightedFitness:
    def test_weighted_mean_with_signs(self):
        value = weighted_fitness(
            {"a": 0.8, "b": 0.2, "ppl": 10.0},
            {"a": "maximize", "b": "maximize", "ppl": "minimize"},
            {"a": 3.0, "b": 1.0, "ppl": 0.5},
        )
        assert value == pytest.approx((3 * 0.8 + 1 * 0.2 - 0.5 * 10.0) / 4.5)

    def test_zero_weight_objective_is_tracked_not_optimized(self):
        assert weighted_fitness({"a": 0.4, "b": 99.0}, {"a": "maximize", "b": "maximize"}, {"a": 1, "b": 0}) == 0.4

    def test_errors(self):
        with pytest.raises(ConfigError, match="at least one weight > 0"):
            weighted_fitness({"a": 1.0}, {"a": "maximize"}, {"a": 0.0})
        with pytest.raises(ConfigError, match="'x' is not an objective; objectives: \\['a'\\]"):
            weighted_fitness({"a": 1.0}, {"a": "maximize"}, {"x": 1.0})


class TestCallableFitness:
    def test_objectives_directions_and_aggregate(self):
        fitness = CallableFitness(sum_of_weights, weights={"score": 1.0, "size": 3.0}, directions={"size": "minimize"})
        result = fitness.evaluate([1.0, 2.0, 3.5], None)
        assert result.objectives == {"score": 6.5, "size": 3.0, AGGREGATE: (6.5 - 3 * 3.0) / 4}
        assert result.directions == {"score": "maximize", "size": "minimize", AGGREGATE: "maximize"}
        assert result.fitness == (6.5 - 9.0) / 4
        assert result.per_example == {} and result.n_examples == {}
        assert set(result.timings) == {"total"} and result.timings["total"] >= 0

    def test_default_weights_are_equal(self):
        result = CallableFitness(sum_of_weights).evaluate([2.0, 2.0], None)
        assert result.fitness == (4.0 + 2.0) / 2

    def test_per_example_from_sequence_and_mapping(self):
        result = CallableFitness(with_examples).evaluate(None, None)
        assert result.per_example == {
            "acc": ExampleScores((0, 1, 2, 3), (1.0, 0.0, 1.0, 0.0)),
            "loss": ExampleScores((3, 7), (2.5, 1.5)),
        }
        assert result.n_examples == {"acc": 4, "loss": 2}
        assert FitnessResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result

    def test_is_a_fitness_with_a_stable_code_keyed_hash(self):
        a, again, b = CallableFitness(sum_of_weights), CallableFitness(sum_of_weights), CallableFitness(with_examples)
        assert isinstance(a, Fitness)
        assert a.spec_hash() == again.spec_hash() != b.spec_hash()
        assert a.describe()["name"] == f"{__name__}.sum_of_weights"
        assert CallableFitness(sum_of_weights, weights={"score": 2}).spec_hash() != a.spec_hash()

    @pytest.mark.parametrize(
        ("fn", "kwargs", "message"),
        [
            (lambda m, t: [1.0], {}, "fn must return a non-empty mapping of objectives, got list"),
            (lambda m, t: {}, {}, "fn must return a non-empty mapping of objectives"),
            (lambda m, t: {"a": "high"}, {}, "objective 'a' must map a name to a number, got 'high'"),
            (lambda m, t: {"a": True}, {}, "objective 'a' must map a name to a number, got True"),
            (lambda m, t: ({"a": 1.0}, [1.0]), {}, "per-example scores must be a mapping, got list"),
            (lambda m, t: ({"a": 1.0}, {"a": ["x"]}), {}, "per-example 'a': expected numbers keyed by distinct"),
            (lambda m, t: {"a": 1.0}, {"weights": {"b": 1.0}}, "name \\['b'\\] but fn returned \\['a'\\]"),
            (lambda m, t: {AGGREGATE: 1.0}, {}, "'fitness' is reserved"),
        ],
    )
    def test_bad_output(self, fn, kwargs, message):
        with pytest.raises(ConfigError, match=message) as err:
            CallableFitness(fn, **kwargs).evaluate(None, None)
        assert "\n" not in str(err.value)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"directions": {"a": "up"}}, "fitness.directions.a: expected maximize or minimize, got 'up'"),
            ({"weights": {"a": -1}}, "fitness.weights.a: expected a finite number >= 0, got -1"),
            ({"weights": {"a": float("inf")}}, "fitness.weights.a: expected a finite number >= 0, got inf"),
        ],
    )
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(ConfigError, match=message):
            CallableFitness(sum_of_weights, **kwargs)

    def test_not_callable(self):
        with pytest.raises(ConfigError, match="expected a callable fn\\(model, tokenizer\\), got int"):
            CallableFitness(3)


class TestResultTypes:
    def test_example_scores_invariants(self):
        assert ExampleScores((2, 5), (1.0, 0.0)).as_dict() == {2: 1.0, 5: 0.0}
        with pytest.raises(ValueError, match="strictly increasing"):
            ExampleScores((5, 2), (1.0, 0.0))
        with pytest.raises(ValueError, match="2 doc ids but 1 scores"):
            ExampleScores((1, 2), (1.0,))


class TestSpec:
    def test_defaults_and_normalization(self):
        spec = parse_fitness_spec({"include_path": "fitness", "tasks": [{"task": "t"}]})
        assert spec.include_path == ["fitness"]
        assert (spec.split, spec.limit, spec.seed, spec.batch_size) == ("validation", None, 0, 32)
        assert (spec.num_fewshot, spec.apply_chat_template, spec.device, spec.dtype) == (None, False, None, None)
        assert (spec.fewshot_as_multiturn, spec.multiturn, spec.system_instruction, spec.gen_kwargs) == (None, False, None, None)
        assert spec.tasks[0].weight == 1.0 and spec.tasks[0].objective == "t"

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            ({"split": "train"}, "fitness: split: Input should be 'validation' or 'test'"),
            ({"dtype": "fp8"}, "fitness: dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
            ({"limit": 0}, "fitness: limit: Input should be greater than or equal to 1"),
            ({"device": "gpu"}, "fitness: device: expected a torch device such as cpu, cuda or cuda:1, got 'gpu'"),
            ({"tasks": [{"task": "t", "weight": float("nan")}]}, "tasks\\[0\\].weight: Input should be a finite"),
            ({"tasks": [{"task": ""}]}, "fitness: tasks\\[0\\].task: String should have at least 1 character"),
        ],
    )
    def test_errors(self, data, message):
        with pytest.raises(ConfigError, match=message) as err:
            parse_fitness_spec({"include_path": "f", "tasks": [{"task": "t"}], **data})
        assert "\n" not in str(err.value)

    def test_include_path_is_optional(self):
        """Without folders, names are looked up among lm-eval's own tasks."""
        assert parse_fitness_spec({"tasks": [{"task": "gsm8k"}]}).include_path == []

    def test_lm_eval_fitness_rejects_bad_spec_before_touching_disk(self):
        with pytest.raises(ConfigError, match="fitness: tasks: Input should be a valid list"):
            LmEvalFitness({"include_path": "/nonexistent", "tasks": "t"})


def test_a_file_fitness_is_identified_by_its_whole_module_and_version(tmp_path):
    """Two modules differing only in a constant the function reads are two fitnesses; so are two
    ``version:`` strings (for helpers imported from elsewhere); the same file is the same fitness."""
    from evomerge.experiment import CallableFitnessConfig
    from evomerge.runtime.worker import build_fitness

    module = tmp_path / "scale.py"
    source = "SCALE = {}\n\n\ndef score(model, tokenizer):\n    return {{'x': SCALE * sum(model)}}\n"

    def spec_hash(scale: float, version: str | None = None) -> str:
        module.write_text(source.format(scale))
        given = {} if version is None else {"version": version}
        return build_fitness(CallableFitnessConfig(python=f"{module}:score", **given)).spec_hash()

    assert spec_hash(1.0) != spec_hash(100.0) and spec_hash(1.0) == spec_hash(1.0)
    assert spec_hash(1.0, version="2") != spec_hash(1.0) and spec_hash(1.0, version="2") == spec_hash(1.0, "2")
    assert build_fitness(CallableFitnessConfig(python=f"{module}:score")).evaluate([1.0, 2.0], None).objectives["x"] == 3.0
