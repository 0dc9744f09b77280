"""lm-eval's built-in tasks by name, its prompt options, and metric directions.

No dataset can be downloaded here, so ``datasets.load_dataset`` (which lm-eval calls to load a
built-in task's data) is replaced by a small local dataset per hub path; the task YAML, the group
structure, prompts, filters and metrics are lm-eval's own. Every comparison is with lm-eval's
``simple_evaluate`` on the same model and data with the same options: the fitness must pass them
exactly as lm-eval does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import pytest
import torch
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

import evomerge.fitness.catalog as catalog
import evomerge.fitness.lm_eval_fitness as lm_eval_fitness
from evomerge.errors import ConfigError, DatasetError
from evomerge.fitness import AGGREGATE, LmEvalFitness
from evomerge.fitness.catalog import full_task_manager

WORDS = ("the", "of", "and", "plus", "minus", "answer", "is", "to", "in", "c")
MMLU_SUBJECTS_SEEN: list[str] = []


def _gsm8k(split: str, n: int) -> list[dict[str, str]]:
    docs = []
    for i in range(n):
        a, b = (i * 7 + (3 if split == "test" else 0)) % 10, (i * 3 + 1) % 10
        docs.append({"question": f"{a} plus {b} {WORDS[i % len(WORDS)]} ?", "answer": f"{a} plus {b} . #### {a + b}"})
    return docs


def _mmlu(subject: str, split: str) -> list[dict[str, Any]]:
    seed = sum(map(ord, subject + split))
    return [
        {
            "question": f"{WORDS[(seed + i) % len(WORDS)]} {i} plus {seed % 7} ?",
            "subject": subject,
            "choices": [str((seed + i + k) % 10) for k in range(4)],
            "answer": (seed + i) % 4,
        }
        for i in range(3 if split != "dev" else 5)
    ]


def _wikitext(split: str) -> list[dict[str, str]]:
    return [{"page": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12 + i))} for i in range(3)]


@pytest.fixture
def hub(monkeypatch) -> list[tuple[str, str | None]]:
    """``datasets.load_dataset`` answered from small local datasets; records (path, name) per call."""
    calls: list[tuple[str, str | None]] = []

    def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
        calls.append((path, name))
        if path == "openai/gsm8k" and name == "main":
            splits = {"train": _gsm8k("train", 8), "test": _gsm8k("test", 5)}
        elif path == "cais/mmlu":
            MMLU_SUBJECTS_SEEN.append(name)
            splits = {split: _mmlu(name, split) for split in ("test", "validation", "dev")}
        elif path == "EleutherAI/wikitext_document_level":
            splits = {split: _wikitext(split) for split in ("train", "validation", "test")}
        else:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.fixture(scope="module")
def tiny(make_pico):
    folder = make_pico(arch="llama", seed=0)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def captured(monkeypatch) -> list[dict[str, Any]]:
    """lm-eval's raw output of every evaluation the fitness runs."""
    outputs: list[dict[str, Any]] = []
    original = lm_eval_fitness.lm_eval_evaluate

    def spy(**kwargs: Any) -> Any:
        outputs.append(original(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(lm_eval_fitness, "lm_eval_evaluate", spy)
    return outputs


def _reference(model, tokenizer, tasks: list[str], **options: Any) -> dict[str, Any]:
    """lm-eval's own evaluation of ``tasks`` (first ``limit`` docs, greedy, no bootstrap)."""
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    return simple_evaluate(
        model=lm, tasks=tasks, task_manager=full_task_manager(), bootstrap_iters=0, log_samples=True, **options
    )


def _shown(samples: list[dict[str, Any]], filter_name: str) -> list[tuple]:
    """What the model was asked and what was scored, per doc, for one filter."""
    return [
        (s["doc_id"], s["arguments"], s["filtered_resps"], s.get("exact_match"), s.get("acc"))
        for s in sorted(samples, key=lambda s: s["doc_id"])
        if s["filter"] == filter_name
    ]


PROMPT_OPTIONS = [
    pytest.param({}, {}, id="plain"),
    pytest.param({"system_instruction": "Solve it ."}, {"system_instruction": "Solve it ."}, id="system"),
    pytest.param(
        {"apply_chat_template": True, "system_instruction": "Solve it ."},
        {"apply_chat_template": True, "fewshot_as_multiturn": True, "system_instruction": "Solve it ."},
        id="chat-multiturn",
    ),
    pytest.param(
        {"apply_chat_template": True, "fewshot_as_multiturn": False},
        {"apply_chat_template": True, "fewshot_as_multiturn": False},
        id="chat-single-turn",
    ),
]


@pytest.mark.parametrize(("ours", "theirs"), PROMPT_OPTIONS)
def test_builtin_gsm8k_with_prompt_options_matches_lm_eval(tiny, hub, captured, ours, theirs):
    model, tokenizer = tiny
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    spec = {
        "split": "test",
        "limit": 4,
        "seed": None,
        "batch_size": 8,
        "gen_kwargs": {"max_gen_toks": 6},
        "tasks": [{"task": "gsm8k", "metric": "exact_match,flexible-extract", "num_fewshot": 2}],
        **ours,
    }
    result = LmEvalFitness(spec).evaluate(model, chat)
    reference = _reference(
        model, chat, ["gsm8k"], num_fewshot=2, gen_kwargs={"max_gen_toks": 6}, limit=4, **theirs
    )

    assert hub == [("openai/gsm8k", "main"), ("openai/gsm8k", "main")]  # once for us, once for lm-eval
    ours_shown = _shown(captured[0]["samples"]["gsm8k"], "flexible-extract")
    theirs_shown = _shown(reference["samples"]["gsm8k"], "flexible-extract")
    assert len(ours_shown) == 4 and ours_shown == theirs_shown
    prompt, kwargs = ours_shown[0][1][0]
    assert prompt.count("####") == 2 and kwargs["max_gen_toks"] == 6 and kwargs["do_sample"] is False
    assert ("Solve it ." in prompt) == ("system_instruction" in ours)
    assert ("user :" in prompt) == bool(ours.get("apply_chat_template"))
    assert result.objectives["gsm8k"] == reference["results"]["gsm8k"]["exact_match,flexible-extract"]
    assert result.directions["gsm8k"] == "maximize"


def test_filter_selection_scores_the_named_filter(tiny, hub, captured):
    model, tokenizer = tiny
    tasks = [
        {"task": "gsm8k", "metric": "exact_match,strict-match", "name": "strict"},
        {"task": "gsm8k", "metric": "exact_match,flexible-extract", "name": "flexible"},
    ]
    spec = {"split": "test", "tasks": tasks, "num_fewshot": 1, "gen_kwargs": "max_gen_toks=4"}
    fitness = LmEvalFitness(spec)
    assert [t.result_key for t in fitness.tasks] == ["exact_match,strict-match", "exact_match,flexible-extract"]
    result = fitness.evaluate(model, tokenizer)
    results = captured[0]["results"]["gsm8k"]
    assert result.objectives["strict"] == results["exact_match,strict-match"]
    assert result.objectives["flexible"] == results["exact_match,flexible-extract"]
    strict = [s for s in captured[0]["samples"]["gsm8k"] if s["filter"] == "strict-match"]
    assert all(s["filtered_resps"] == ["[invalid]"] for s in strict)  # the pico model never writes '#### n'
    assert len(hub) == 1  # one task, listed twice, built and evaluated once


def test_mmlu_group_expands_to_its_subtasks_and_aggregates_as_lm_eval(tiny, hub, captured):
    model, tokenizer = tiny
    MMLU_SUBJECTS_SEEN.clear()
    fitness = LmEvalFitness({"split": "test", "limit": 2, "seed": None, "tasks": [{"task": "mmlu"}]})
    (task,) = fitness.tasks
    assert task.is_group and task.result_key == "acc,none" and task.direction == "maximize"
    leaves = [leaf.name for leaf in task.leaves]
    assert len(leaves) == len(set(leaves)) == 57 and "mmlu_abstract_algebra" in leaves
    assert len(MMLU_SUBJECTS_SEEN) == 57
    result = fitness.evaluate(model, tokenizer)
    reference = _reference(model, tokenizer, ["mmlu"], limit=2)

    assert result.objectives["mmlu"] == reference["results"]["mmlu"]["acc,none"]
    assert 0.0 < result.objectives["mmlu"] < 1.0
    scores = result.per_example["mmlu"]
    assert result.n_examples == {"mmlu": 114} and len(scores.scores) == 114
    assert sum(scores.scores) / 114 == pytest.approx(result.objectives["mmlu"])  # weight_by_size: pooled
    for leaf in task.leaves:  # each subtask's docs keep distinct ids: offset by the earlier full splits
        mine = [s for i, s in zip(scores.doc_ids, scores.scores) if leaf.offset <= i < leaf.offset + 3]
        assert mine == [s["acc"] for s in sorted(reference["samples"][leaf.name], key=lambda s: s["doc_id"])]


def test_a_lower_is_better_metric_is_minimized(tiny, hub):
    model, tokenizer = tiny
    result = LmEvalFitness({"tasks": [{"task": "wikitext", "metric": "word_perplexity"}]}).evaluate(model, tokenizer)
    reference = _reference(model, tokenizer, ["wikitext"])
    assert result.directions["wikitext"] == "minimize"  # lm-eval's higher_is_better, not assumed
    assert result.objectives["wikitext"] == reference["results"]["wikitext"]["word_perplexity,none"] > 1.0
    assert result.objectives[AGGREGATE] == -result.objectives["wikitext"]


def test_split_mapping_selects_the_dataset_split(tiny, hub):
    model, tokenizer = tiny
    task = {"task": "gsm8k", "splits": {"validation": "train"}, "num_fewshot": 0, "gen_kwargs": {"max_gen_toks": 1}}
    result = LmEvalFitness({"tasks": [task]}).evaluate(model, tokenizer)
    assert result.n_examples == {"gsm8k": 8}  # the train split (8 docs), not test (5)
    named = "its YAML names training_split train, test_split test, fewshot_split train"
    with pytest.raises(ConfigError, match=f"has no validation_split \\({named}\\); name the dataset split to use"):
        LmEvalFitness({"tasks": [{"task": "gsm8k"}]})


def test_every_prompt_option_is_part_of_the_fitness_hash(hub):
    base = {"split": "test", "gen_kwargs": {"max_gen_toks": 6}, "tasks": [{"task": "gsm8k"}]}
    variants = [
        {"apply_chat_template": True},
        {"apply_chat_template": True, "fewshot_as_multiturn": False},
        {"system_instruction": "Solve it ."},
        {"num_fewshot": 3},
        {"tasks": [{"task": "gsm8k", "num_fewshot": 2}]},
        {"gen_kwargs": {"max_gen_toks": 7}},
        {"tasks": [{"task": "gsm8k", "gen_kwargs": {"until": ["?"]}}]},
        {"tasks": [{"task": "gsm8k", "metric": "exact_match,flexible-extract"}]},
        {"tasks": [{"task": "gsm8k", "splits": {"test": "train"}}]},
    ]
    hashes = [LmEvalFitness(base).spec_hash()] + [LmEvalFitness({**base, **v}).spec_hash() for v in variants]
    assert len(set(hashes)) == len(hashes)
    assert LmEvalFitness({**base, "batch_size": 3}).spec_hash() == hashes[0]
    # the effective setting counts, not how it was written: 2 shots spec-wide or for the task alike
    assert LmEvalFitness({**base, "num_fewshot": 2}).spec_hash() == hashes[5]
    # lm-eval's default: with a chat template, few-shot examples are turns; saying so changes nothing
    explicit = LmEvalFitness({**base, "apply_chat_template": True, "fewshot_as_multiturn": True}).spec_hash()
    assert explicit == hashes[1]


def test_num_fewshot_follows_lm_eval(hub):
    """The spec-wide count overrides a task's default except a YAML 0 (as --num_fewshot); a per-task count wins."""
    fitness = LmEvalFitness({"split": "test", "tasks": [{"task": "gsm8k"}]})
    assert fitness.tasks[0].task.config.num_fewshot == 5  # gsm8k.yaml's own
    fitness = LmEvalFitness({"split": "test", "num_fewshot": 1, "tasks": [{"task": "gsm8k"}]})
    assert fitness.tasks[0].task.config.num_fewshot == 1


def test_offline_without_a_cached_dataset_is_one_line(hub):
    with pytest.raises(DatasetError) as err:
        LmEvalFitness({"split": "test", "tasks": [{"task": "arc_easy"}]})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("fitness task 'arc_easy': dataset allenai/ai2_arc (ARC-Easy) is not in the local")
    assert "HF_DATASETS_OFFLINE=1" in message


def test_unknown_names_and_tags(hub):
    with pytest.raises(ConfigError, match="'gsm8kk': not found in include_path \\(none given\\) nor among .*did you mean: gsm8k"):
        LmEvalFitness({"tasks": [{"task": "gsm8kk"}]})
    with pytest.raises(ConfigError, match="'ai2_arc': is a tag of 2 tasks \\(arc_challenge, arc_easy\\) with no aggregate"):
        LmEvalFitness({"tasks": [{"task": "ai2_arc"}]})
    with pytest.raises(ConfigError, match="'mmlu_anatomy', which 'mmlu' evaluates too; list each task once"):
        LmEvalFitness({"split": "test", "limit": 1, "tasks": [{"task": "mmlu"}, {"task": "mmlu_anatomy"}]})
    assert hub[-1][0] == "cais/mmlu"


def test_include_path_tasks_never_index_lm_eval_s_own(monkeypatch):
    """The zoo's path: every name is found in include_path, so lm-eval's ~15 000 YAML files are never read."""

    def refuse(*args: Any) -> None:
        raise AssertionError("lm-eval's built-in index was built")

    monkeypatch.setattr(catalog, "full_task_manager", refuse)
    folder = Path(__file__).parent / "data" / "fitness"
    fitness = LmEvalFitness({"include_path": str(folder), "tasks": [{"task": "tiny_mc"}, {"task": "tiny_custom"}]})
    assert [t.name for t in fitness.tasks] == ["tiny_mc", "tiny_custom"]
    with pytest.raises(AssertionError, match="built-in index was built"):
        LmEvalFitness({"include_path": str(folder), "tasks": [{"task": "tiny_mc"}, {"task": "gsm8k"}]})


@torch.no_grad()
def test_generation_stays_greedy_with_gen_kwargs(tiny, hub):
    model, tokenizer = tiny
    fitness = LmEvalFitness({"split": "test", "gen_kwargs": {"max_gen_toks": 3, "until": ["?"]}, "tasks": [{"task": "gsm8k"}]})
    kwargs = fitness.tasks[0].task.config.generation_kwargs
    assert kwargs["max_gen_toks"] == 3 and kwargs["until"] == ["?"] and kwargs["do_sample"] is False
    with pytest.raises(ConfigError, match="fitness: gen_kwargs: do_sample: a search compares candidates"):
        LmEvalFitness({"split": "test", "gen_kwargs": {"do_sample": True}, "tasks": [{"task": "gsm8k"}]})
    with pytest.raises(ConfigError, match="fitness: tasks\\[0\\].gen_kwargs: top_p: a sampling setting"):
        LmEvalFitness({"split": "test", "tasks": [{"task": "gsm8k", "gen_kwargs": {"top_p": 0.9}}]})


def test_offline_message_from_the_real_loader(tmp_path, monkeypatch):
    """datasets' own offline refusal (an empty cache, HF_DATASETS_OFFLINE=1 as in every test) becomes the one line."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DatasetError, match="^fitness task 'gsm8k': dataset openai/gsm8k \\(main\\) is not in the local"):
        LmEvalFitness({"split": "test", "tasks": [{"task": "gsm8k"}]})
