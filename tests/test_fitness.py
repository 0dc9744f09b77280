"""LmEvalFitness on a tiny in-memory Llama: values, in-place weight swaps, subsets, errors, offline.

The model is a random-init pico Llama (conftest's ``make_pico``). The generate_until task "cheats":
its answers are the model's own greedy outputs for some prompts and deliberately wrong for others,
so exact match is known per example before lm-eval runs.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from evomerge.errors import ConfigError, ModelError
from evomerge.fitness import AGGREGATE, FitnessResult, LmEvalFitness

DATA = Path(__file__).parent / "data" / "fitness"
N_VALIDATION, N_TEST = 24, 6


@pytest.fixture(scope="module")
def tiny(make_pico) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    folder = make_pico(arch="llama", seed=0)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _prompt(a: int, b: int) -> str:
    return f"{a} plus {b} is"


@torch.no_grad()
def greedy(model, tokenizer, prompt: str) -> str:
    """The one token lm-eval's greedy generate_until will produce ('' for a special token)."""
    ids = tokenizer(prompt)["input_ids"]
    top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    return "" if top in tokenizer.all_special_ids else tokenizer.decode([top])


@torch.no_grad()
def mc_correct(model, tokenizer, doc: dict) -> float:
    ids = tokenizer(_prompt(doc["a"], doc["b"]))["input_ids"]
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
    choices = [tokenizer.convert_tokens_to_ids(c) for c in ("1", "2", "3", "4")]
    return float(int(torch.stack([logprobs[c] for c in choices]).argmax()) == doc["gold"])


def _gen_docs(model, tokenizer, n: int, offset: int, wrong_every: int | None) -> list[dict]:
    docs = []
    for i in range(n):
        a, b = (i * 7 + offset) % 10, (i * 3 + 1 + i // 10) % 10
        answer = greedy(model, tokenizer, _prompt(a, b)) or "0"
        if wrong_every and i % wrong_every == 0:
            answer += "x"  # one token never decodes to this
        docs.append({"a": a, "b": b, "answer": answer})
    return docs


def _write_tasks(root: Path, model, tokenizer) -> Path:
    shutil.copytree(DATA, root, dirs_exist_ok=True)
    for split, docs in (
        ("validation", _gen_docs(model, tokenizer, N_VALIDATION, 0, wrong_every=3)),
        ("test", _gen_docs(model, tokenizer, N_TEST, 5, wrong_every=None)),
    ):
        (root / f"gen_{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root


@pytest.fixture(scope="module")
def tasks_dir(tiny, tmp_path_factory) -> Path:
    return _write_tasks(tmp_path_factory.mktemp("fitness_tasks"), *tiny)


def _docs(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def _expected_gen(model, tokenizer, docs: list[dict]) -> list[float]:
    return [float(greedy(model, tokenizer, _prompt(d["a"], d["b"])) == d["answer"]) for d in docs]


def _spec(folder: Path, tasks: list, **extra) -> dict:
    return {"include_path": str(folder), "tasks": tasks, "batch_size": 8, **extra}


def test_generate_until_values_order_and_ids(tiny, tasks_dir):
    model, tokenizer = tiny
    expected = _expected_gen(model, tokenizer, _docs(tasks_dir, "gen_validation.jsonl"))
    assert 0 < sum(expected) < len(expected)  # the fixture really mixes right and wrong answers
    result = LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_gen"}])).evaluate(model, tokenizer)

    scores = result.per_example["tiny_gen"]
    assert scores.doc_ids == tuple(range(N_VALIDATION))
    assert list(scores.scores) == expected
    assert result.objectives == {"tiny_gen": sum(expected) / N_VALIDATION, AGGREGATE: sum(expected) / N_VALIDATION}
    assert result.directions == {"tiny_gen": "maximize", AGGREGATE: "maximize"}
    assert result.n_examples == {"tiny_gen": N_VALIDATION}
    t = result.timings
    assert t["total"] > t["generate"] > t["forward"] > 0 and t["overhead"] == pytest.approx(t["total"] - t["forward"])


def test_multiple_choice_matches_direct_loglikelihood(tiny, tasks_dir):
    model, tokenizer = tiny
    docs = _docs(tasks_dir, "mc_validation.jsonl")
    expected = [mc_correct(model, tokenizer, d) for d in docs]
    result = LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_mc", "metric": "acc"}])).evaluate(model, tokenizer)
    assert list(result.per_example["tiny_mc"].scores) == expected
    assert result.objectives["tiny_mc"] == pytest.approx(sum(expected) / len(docs))
    assert result.timings["generate"] == 0.0 and result.timings["forward"] > 0  # loglikelihood: no generate


def test_weighted_aggregate_with_a_minimized_objective(tiny, tasks_dir):
    model, tokenizer = tiny
    spec = _spec(
        tasks_dir,
        [
            {"task": "tiny_gen", "weight": 2.0},
            {"task": "tiny_mc", "weight": 1.0, "name": "mc"},
            {"task": "tiny_ppl", "weight": 0.5, "metric": "word_perplexity"},
        ],
    )
    result = LmEvalFitness(spec).evaluate(model, tokenizer)
    o = result.objectives
    assert result.directions == {
        "tiny_gen": "maximize",
        "mc": "maximize",
        "tiny_ppl": "minimize",
        AGGREGATE: "maximize",
    }
    assert o["tiny_ppl"] > 1.0
    assert o[AGGREGATE] == pytest.approx((2.0 * o["tiny_gen"] + 1.0 * o["mc"] - 0.5 * o["tiny_ppl"]) / 3.5)
    assert set(result.per_example) == {"tiny_gen", "mc"}  # perplexity has no per-example score
    assert result.n_examples == {"tiny_gen": N_VALIDATION, "mc": 12, "tiny_ppl": 6}
    assert FitnessResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_one_task_scored_by_two_metrics(tiny, tasks_dir):
    model, tokenizer = tiny
    spec = _spec(tasks_dir, [{"task": "tiny_mc"}, {"task": "tiny_mc", "name": "mc_norm", "metric": "acc_norm"}])
    fitness = LmEvalFitness(spec)
    assert fitness.tasks[0].task is fitness.tasks[1].task  # built and evaluated once
    result = fitness.evaluate(model, tokenizer)
    assert set(result.objectives) == {"tiny_mc", "mc_norm", AGGREGATE}
    assert result.per_example["mc_norm"] == result.per_example["tiny_mc"]  # one-character choices: same ranking
    assert result.objectives[AGGREGATE] == result.objectives["tiny_mc"]


def test_in_place_weight_swap_is_picked_up(tiny, tasks_dir, monkeypatch):
    def no_cache(*args, **kwargs):
        raise AssertionError("lm-eval's request cache must stay unused")

    monkeypatch.setattr("lm_eval.api.task.load_from_cache", no_cache)
    monkeypatch.setattr("lm_eval.api.task.save_to_cache", no_cache)
    base, tokenizer = tiny
    model = copy.deepcopy(base)
    docs = _docs(tasks_dir, "gen_validation.jsonl")
    fitness = LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_gen"}, {"task": "tiny_mc"}]))
    before = fitness.evaluate(model, tokenizer)
    wrapper = fitness._lm
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # greedy now picks the former least likely token
    after = fitness.evaluate(model, tokenizer)

    assert fitness._lm is wrapper  # same HFLM, same task objects: only the weights changed
    expected = _expected_gen(model, tokenizer, docs)
    assert list(after.per_example["tiny_gen"].scores) == expected
    assert after.objectives["tiny_gen"] != before.objectives["tiny_gen"]
    mc_docs = _docs(tasks_dir, "mc_validation.jsonl")
    assert list(after.per_example["tiny_mc"].scores) == [mc_correct(model, tokenizer, d) for d in mc_docs]
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    assert fitness.evaluate(model, tokenizer).objectives == before.objectives


def test_test_split_selects_held_out_data(tiny, tasks_dir):
    model, tokenizer = tiny
    expected = _expected_gen(model, tokenizer, _docs(tasks_dir, "gen_test.jsonl"))
    result = LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_gen"}], split="test")).evaluate(model, tokenizer)
    assert result.n_examples == {"tiny_gen": N_TEST}
    assert list(result.per_example["tiny_gen"].scores) == expected
    assert result.objectives["tiny_gen"] == sum(expected) / N_TEST > 0


def test_seeded_subset_is_deterministic_and_scored_by_original_ids(tiny, tasks_dir):
    model, tokenizer = tiny
    expected = _expected_gen(model, tokenizer, _docs(tasks_dir, "gen_validation.jsonl"))

    def run(**extra) -> FitnessResult:
        return LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_gen"}], limit=7, **extra)).evaluate(model, tokenizer)

    first, again, other = run(seed=3), run(seed=3), run(seed=4)
    ids = first.per_example["tiny_gen"].doc_ids
    assert len(ids) == 7 and list(ids) == sorted(set(ids)) and ids != tuple(range(7))
    assert again.per_example["tiny_gen"] == first.per_example["tiny_gen"]
    assert other.per_example["tiny_gen"].doc_ids != ids
    assert list(first.per_example["tiny_gen"].scores) == [expected[i] for i in ids]
    assert first.objectives["tiny_gen"] == pytest.approx(sum(expected[i] for i in ids) / 7)
    assert run(seed=None).per_example["tiny_gen"].doc_ids == tuple(range(7))


def test_generation_is_greedy_despite_sampling_settings(tiny, tasks_dir):
    model, tokenizer = tiny
    fitness = LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_gen"}]))
    kwargs = fitness.tasks[0].task.config.generation_kwargs
    assert kwargs["do_sample"] is False and "temperature" in kwargs and kwargs["temperature"] == 0.0
    runs = [fitness.evaluate(model, tokenizer).per_example["tiny_gen"] for _ in range(2)]
    assert runs[0] == runs[1]


def test_chat_template_path(tiny, tasks_dir):
    model, tokenizer = tiny
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = "{% for m in messages %}plus {{ m['content'] }}{% endfor %}"
    docs = _docs(tasks_dir, "gen_validation.jsonl")
    expected = [float(greedy(model, tokenizer, "plus " + _prompt(d["a"], d["b"])) == d["answer"]) for d in docs]
    chat = LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_gen"}], apply_chat_template=True))
    assert list(chat.evaluate(model, chat_tokenizer).per_example["tiny_gen"].scores) == expected
    assert expected != _expected_gen(model, tokenizer, docs)  # the template really changed the prompts
    with pytest.raises(ModelError, match="apply_chat_template: the tokenizer has no chat template"):
        chat.evaluate(model, tokenizer)


def test_describe_keys_what_is_measured(tasks_dir, tmp_path, tiny):
    tasks = [{"task": "tiny_gen"}, {"task": "tiny_mc", "weight": 2}, {"task": "tiny_custom"}]
    a = LmEvalFitness(_spec(tasks_dir, tasks))
    assert a.spec_hash() == LmEvalFitness(_spec(tasks_dir, tasks)).spec_hash()
    assert a.spec_hash() == LmEvalFitness({**_spec(tasks_dir, tasks), "batch_size": 3}).spec_hash()
    assert a.spec_hash() != LmEvalFitness(_spec(tasks_dir, tasks, limit=5)).spec_hash()
    assert a.spec_hash() != LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_gen"}, {"task": "tiny_mc"}])).spec_hash()
    moved = _write_tasks(tmp_path / "moved", *tiny)  # same content elsewhere: same hash
    assert LmEvalFitness(_spec(moved, tasks)).spec_hash() == a.spec_hash()
    mc_data = moved / "mc_validation.jsonl"
    mc_data.write_text(mc_data.read_text().replace('"gold": 3', '"gold": 2'))
    assert LmEvalFitness(_spec(moved, tasks)).spec_hash() != a.spec_hash()
    custom = [{"task": "tiny_custom"}]  # data read by a Python function: hashed by content
    assert LmEvalFitness(_spec(moved, custom)).spec_hash() != LmEvalFitness(_spec(tasks_dir, custom)).spec_hash()


def test_included_yaml_and_python_function(tiny, tasks_dir, tmp_path):
    model, tokenizer = tiny
    spec = _spec(tasks_dir, [{"task": "tiny_gen"}, {"task": "tiny_fn"}])
    result = LmEvalFitness(spec).evaluate(model, tokenizer)
    assert result.per_example["tiny_fn"] == result.per_example["tiny_gen"]

    copy_dir = _write_tasks(tmp_path / "copy", model, tokenizer)
    hashes = [LmEvalFitness(_spec(copy_dir, [{"task": "tiny_fn"}])).spec_hash()]
    for edited in ("fitness_utils.py", "tiny_gen.yaml"):  # the function file, then the included YAML
        (copy_dir / edited).write_text((copy_dir / edited).read_text() + "\n# edited\n")
        hashes.append(LmEvalFitness(_spec(copy_dir, [{"task": "tiny_fn"}])).spec_hash())
    assert len(set(hashes)) == 3


def test_data_files_resolve_against_the_yaml_folder(tiny, tasks_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for gen_validation.jsonl here
    model, tokenizer = tiny
    result = LmEvalFitness({"include_path": tasks_dir.name, "tasks": [{"task": "tiny_gen"}]}, base_dir=tasks_dir.parent)
    assert result.evaluate(model, tokenizer).n_examples == {"tiny_gen": N_VALIDATION}


def test_custom_dataset_task(tiny, tasks_dir):
    model, tokenizer = tiny
    result = LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_mc"}, {"task": "tiny_custom"}])).evaluate(model, tokenizer)
    assert result.per_example["tiny_custom"] == result.per_example["tiny_mc"]


def test_evaluation_is_quiet(tiny, tasks_dir, capfd):
    model, tokenizer = tiny
    tasks = [{"task": "tiny_gen"}, {"task": "tiny_mc"}, {"task": "tiny_custom"}]
    LmEvalFitness(_spec(tasks_dir, tasks)).evaluate(model, tokenizer)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_no_network_attempt(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model, tokenizer = tiny
    folder = _write_tasks(tmp_path / "fresh", model, tokenizer)  # new files: datasets really loads them
    tasks = [{"task": "tiny_gen"}, {"task": "tiny_mc"}, {"task": "tiny_ppl"}]
    result = LmEvalFitness(_spec(folder, tasks)).evaluate(model, tokenizer)
    assert result.n_examples == {"tiny_gen": N_VALIDATION, "tiny_mc": 12, "tiny_ppl": 6}
    assert attempts == []


@pytest.mark.parametrize(
    ("tasks", "extra", "message"),
    [
        ([{"task": "nope"}], {}, "task 'nope': not found in include_path .*tiny_custom, tiny_fn, tiny_gen.* nor among lm-eval's [0-9]+ built-in"),
        (
            [{"task": "tiny_mc", "metric": "accuracy"}],
            {},
            "fitness task 'tiny_mc': metric 'accuracy' is not reported; available metrics: acc, acc_norm$",
        ),
        ([{"task": "tiny_mc", "metric": "acc,strict"}], {}, "metric 'acc,strict' is not reported"),
        (
            [{"task": "missing_file"}],
            {},
            "missing_file.yaml\\): dataset_kwargs.data_files.validation: data file 'does_not_exist.jsonl' not found",
        ),
        (
            [{"task": "broken_data"}],
            {},
            "fitness task 'broken_data' .*broken_data.yaml\\): cannot load its data \\(broken.jsonl\\): ",
        ),
        (
            [{"task": "tiny_mc"}],
            {"split": "test"},
            "fitness task 'tiny_mc' .*: has no test_split .*; name the dataset split to use .*splits: {test: train}.* or use split: validation",
        ),
        ([{"task": "tiny_group"}], {}, "fitness task 'tiny_group': is a group without an aggregate_metric_list"),
        ([{"task": "tiny_gen"}], {"batch_sise": 4}, "fitness: batch_sise: unknown key \\(did you mean 'batch_size'"),
        ([{"task": "tiny_gen", "wieght": 1}], {}, "fitness: tasks\\[0\\].wieght: unknown key \\(did you mean 'weight'"),
        ([{"task": "tiny_gen", "weight": -1}], {}, "fitness: tasks\\[0\\].weight: Input should be greater than or"),
        ([{"task": "tiny_gen", "weight": 0}], {}, "fitness: tasks: at least one task needs a weight > 0$"),
        ([{"task": "tiny_gen"}, {"task": "tiny_gen"}], {}, "fitness: tasks: objective 'tiny_gen' appears twice"),
        ([{"task": "tiny_gen", "name": "fitness"}], {}, "fitness: tasks: the objective name 'fitness' .* is reserved"),
        ([], {}, "fitness: tasks: List should have at least 1 item"),
        (
            [{"task": "tiny_mc"}, {"task": "tiny_mc", "name": "b", "limit": 3}],
            {},
            "fitness: tasks: task 'tiny_mc' is listed twice with different limit/num_fewshot/gen_kwargs/splits \\(tasks\\[1\\]\\)",
        ),
        ([{"task": "tiny_gen"}], {"include_path": "/no/such"}, "fitness.include_path: folder '/no/such' not found"),
    ],
)
def test_config_errors_are_one_line(tasks_dir, tasks, extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        LmEvalFitness({**_spec(tasks_dir, tasks), **extra})
    assert "\n" not in str(err.value)


def test_model_errors(tiny, tasks_dir):
    model, tokenizer = tiny
    fitness = LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_mc"}], dtype="bfloat16", device="cpu"))
    with pytest.raises(ModelError, match="fitness.dtype: the model is float32, expected bfloat16"):
        fitness.evaluate(model, tokenizer)
    on_gpu = LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_mc"}], device="cuda"))
    with pytest.raises(ModelError, match="fitness.device: the model is on cpu, expected cuda"):
        on_gpu.evaluate(model, tokenizer)
    with pytest.raises(ModelError, match="expected a transformers PreTrainedModel, got Linear"):
        on_gpu.evaluate(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(ModelError, match="expected a transformers tokenizer, got str"):
        LmEvalFitness(_spec(tasks_dir, [{"task": "tiny_mc"}])).evaluate(model, "tok")
    with pytest.raises(ModelError, match="'long_gen': max_gen_toks 500 leaves no room .* model's 128 positions"):
        LmEvalFitness(_spec(tasks_dir, [{"task": "long_gen"}])).evaluate(model, tokenizer)


def test_template_cache_renders_like_lm_eval():
    import jinja2
    import lm_eval.utils

    from evomerge.fitness.runtime import cached_apply_template, use_template_cache

    use_template_cache()
    assert lm_eval.utils.apply_template is cached_apply_template
    doc = {"a": 3, "b": [1, 2]}
    template = "{{a}} and {{b|length}} {{ 'x1'|regex_replace('[0-9]', 'y') }}"
    assert cached_apply_template(template, doc) == lm_eval.utils.env.from_string(template).render(**doc) == "3 and 2 xy"
    with pytest.raises(jinja2.UndefinedError):
        cached_apply_template("{{missing}}", doc)
