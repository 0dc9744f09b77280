"""The lm-eval fitness: score a resident model on lm-eval tasks, paying the set-up cost once.

Set-up (once per evaluator): every task and group found by name (``include_path``, then lm-eval's
built-in tasks), its split, subset, metric, few-shot and generation settings fixed, its prompts
built on first use. Per candidate: ``lm_eval.evaluator.evaluate`` on those same task objects, with
the spec's prompt options (chat template, multi-turn few-shot, system instruction) passed as
lm-eval's ``simple_evaluate`` passes them, the model wrapped in HFLM (the wrapper is reused while
the model and tokenizer objects are the same), no bootstrap, per-sample logging on. Groups are
aggregated by lm-eval itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lm_eval
import torch
from lm_eval.evaluator import evaluate as lm_eval_evaluate
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge.errors import ModelError
from evomerge.fitness.base import Fitness
from evomerge.fitness.chunked import Partial, RacePlan
from evomerge.fitness.lm import ForwardTimer, ResidentLM
from evomerge.fitness.racing import Bar
from evomerge.fitness.result import FitnessResult, finalize
from evomerge.fitness.runtime import quiet_lm_eval, use_template_cache
from evomerge.fitness.spec import FitnessSpec, parse_fitness_spec
from evomerge.fitness.tasks import Leaf, PreparedTask, build_catalog, load_tasks


class LmEvalFitness(Fitness):
    """Weighted lm-eval task metrics of a model already in memory.

    ``base_dir`` anchors relative ``include_path`` folders (the experiment file's folder);
    ``setup_seconds`` records what construction cost, paid once. ``lean_greedy=False`` decodes
    with Hugging Face's ``generate`` instead of ``ResidentLM``'s identical lean loop (a reference
    for tests and benchmarks).
    """

    def __init__(
        self, spec: FitnessSpec | Mapping[str, Any], *, base_dir: str | Path | None = None, lean_greedy: bool = True
    ) -> None:
        start = time.perf_counter()
        self._lean_greedy = lean_greedy
        self.spec = parse_fitness_spec(spec)
        quiet_lm_eval()
        use_template_cache()
        catalog = build_catalog(self.spec.include_path, Path(base_dir) if base_dir is not None else None)
        self._tasks = load_tasks(self.spec, catalog)
        groups = {g.name: g for t in self._tasks for g in t.groups}
        self._task_dict = {
            "tasks": {leaf.name: leaf.task for t in self._tasks for leaf in t.leaves},
            "groups": groups,
            "group_map": {name: g.child_names for name, g in groups.items()},
        }
        self._lm: ResidentLM | None = None
        racing = self.spec.racing
        self._race = None if racing is None else RacePlan(self._tasks, racing, self.spec.seed)
        self.setup_seconds = time.perf_counter() - start

    @property
    def tasks(self) -> tuple[PreparedTask, ...]:
        return tuple(self._tasks)

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "kind": "lm_eval",
            "lm_eval_version": lm_eval.__version__,
            "split": spec.split,
            "seed": spec.seed,
            "apply_chat_template": spec.apply_chat_template,
            "fewshot_as_multiturn": spec.multiturn,
            "system_instruction": spec.system_instruction,
            "dtype": spec.dtype,
            "racing": None if spec.racing is None else spec.racing.model_dump(),
            "tasks": [
                {
                    "task": t.name,
                    "objective": t.spec.objective,
                    "weight": t.spec.weight,
                    "metric": t.result_key,
                    "direction": t.direction,
                    "group_sha256": t.group_digest,
                    "leaves": [_describe_leaf(leaf) for leaf in t.leaves],
                }
                for t in self._tasks
            ],
        }

    def evaluate(self, model: Any, tokenizer: Any, bar: Bar | None = None) -> FitnessResult:
        """Score every example, or with ``racing`` on and a ``bar`` given, race: stop once the
        candidate cannot reach the bar and return the estimate (``FitnessResult.estimate``)."""
        self._check_model(model, tokenizer)
        lm = self._wrapper(model, tokenizer)
        lm.generate_seconds = 0.0
        start = time.perf_counter()
        with ForwardTimer(model) as timer:
            if self._race is not None and bar is not None:
                output = self._race.run(lm, self._lm_eval, self._task_dict, bar)
            else:
                output = self._lm_eval(lm, self._task_dict)
        total = time.perf_counter() - start
        timings = {"total": total, "forward": timer.seconds, "generate": lm.generate_seconds, "overhead": total - timer.seconds}
        directions = {t.spec.objective: t.direction for t in self._tasks}
        weights = {t.spec.objective: t.spec.weight for t in self._tasks}
        if isinstance(output, Partial):
            return finalize(
                output.objectives, directions, weights, output.per_example, timings, output.n_examples, output.estimate
            )
        objectives, per_example = {}, {}
        for task in self._tasks:
            objectives[task.spec.objective] = float(output["results"][task.name][task.result_key])
            scores = task.example_scores(output["samples"])
            if scores is not None:
                per_example[task.spec.objective] = scores
        n_examples = {t.spec.objective: t.n_examples for t in self._tasks}
        return finalize(objectives, directions, weights, per_example, timings, n_examples)

    def _lm_eval(self, lm: Any, task_dict: Mapping[str, Any]) -> dict[str, Any]:
        """lm-eval's ``evaluate`` with the spec's prompt options, as ``simple_evaluate`` passes them."""
        return lm_eval_evaluate(
            lm=lm,
            task_dict=task_dict,
            bootstrap_iters=0,
            log_samples=True,
            system_instruction=self.spec.system_instruction,
            apply_chat_template=self.spec.apply_chat_template,
            fewshot_as_multiturn=self.spec.multiturn,
        )

    def _wrapper(self, model: Any, tokenizer: Any) -> ResidentLM:
        """The HFLM for this (model, tokenizer) pair, reused while both objects stay the same."""
        if self._lm is not None and self._lm.model is model and self._lm.tokenizer is tokenizer:
            return self._lm
        lm = ResidentLM(model, tokenizer, batch_size=self.spec.batch_size, lean_greedy=self._lean_greedy)
        for task in (leaf.task for t in self._tasks for leaf in t.leaves):
            if task.OUTPUT_TYPE != "generate_until":
                continue
            new_tokens = (task.config.generation_kwargs or {}).get("max_gen_toks", lm.max_gen_toks)
            if new_tokens >= lm.max_length:
                raise ModelError(
                    f"fitness task '{task.config.task}': max_gen_toks {new_tokens} leaves no room for the prompt in "
                    f"the model's {lm.max_length} positions; set fitness.gen_kwargs.max_gen_toks"
                )
        self._lm = lm
        return self._lm

    def _check_model(self, model: Any, tokenizer: Any) -> None:
        if not isinstance(model, PreTrainedModel):
            raise ModelError(f"fitness: expected a transformers PreTrainedModel, got {type(model).__name__}")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ModelError(f"fitness: expected a transformers tokenizer, got {type(tokenizer).__name__}")
        if self.spec.device is not None and not _same_device(model.device, torch.device(self.spec.device)):
            raise ModelError(f"fitness.device: the model is on {model.device}, expected {self.spec.device}")
        if self.spec.dtype is not None and model.dtype != getattr(torch, self.spec.dtype):
            actual = str(model.dtype).removeprefix("torch.")
            raise ModelError(f"fitness.dtype: the model is {actual}, expected {self.spec.dtype}")
        if self.spec.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ModelError("fitness.apply_chat_template: the tokenizer has no chat template")


def _describe_leaf(leaf: Leaf) -> dict[str, Any]:
    """What decides one task's scores: its YAML and data, the docs drawn, its prompt and decoding settings."""
    config = leaf.task.config
    described = {
        "task": leaf.name,
        "split": config.test_split,
        "num_fewshot": config.num_fewshot,
        "doc_ids_sha256": _ids_digest(leaf.doc_ids),
        **leaf.digest,
    }
    if leaf.task.OUTPUT_TYPE == "generate_until":
        described["generation_kwargs"] = json.loads(json.dumps(config.generation_kwargs, sort_keys=True, default=str))
    return described


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    """'cuda' accepts any CUDA device; 'cuda:1' only that one (an index-less device counts as 0)."""
    if actual.type != wanted.type:
        return False
    return wanted.index is None or (actual.index or 0) == wanted.index


def _ids_digest(doc_ids: tuple[int, ...]) -> str:
    return hashlib.sha256(",".join(map(str, doc_ids)).encode()).hexdigest()
