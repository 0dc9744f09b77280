"""``build_zoo``: train the tokenizer, base and experts of a spec, score them, write ``zoo.json``.

The output folder holds one ordinary Hugging Face folder per model (safetensors, config, tokenizer,
model card), the lm-eval task folder ``fitness/`` for the spec's tasks, the spec itself and
``zoo.json``. The build is cached by ``spec_hash``: when ``zoo.json`` carries the same hash and
every model folder is present, nothing is retrained (``force=True`` rebuilds). ``zoo.json`` is
written last, so an interrupted build is never mistaken for a finished one. Only an empty folder or
a zoo is built into (``evomerge.zoo.folder``): a build never deletes the user's files. A spec with
``kernels: portable`` (the default) trains in a child process pinned to float kernels that every
x86-64 CPU has (``evomerge.zoo.portable``), so the zoo's weights do not depend on the machine.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import yaml
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.corpus import base_sequence
from evomerge.zoo.experts import train_config, train_experts
from evomerge.zoo.fitness_files import write_fitness
from evomerge.zoo.folder import (
    BUILD_MARKER,
    INDEX_FILE,
    SPEC_FILE,
    cached_index,
    check_buildable,
)
from evomerge.zoo.index import ModelEntry, SettingEntry, TaskEntry, ZooIndex
from evomerge.zoo.model import build_base_model, llama_config
from evomerge.zoo.model_card import model_card
from evomerge.zoo.portable import build_in_child
from evomerge.zoo.quick_eval import accuracy
from evomerge.zoo.spec import (
    ExpertSpec,
    ZooSpec,
    load_spec,
    parse_spec,
    spec_hash,
)
from evomerge.zoo.tasks import Example, task
from evomerge.zoo.tokenizer import build_tokenizer
from evomerge.zoo.train import TrainStats, train


def build_zoo(spec_path: str | Path | ZooSpec | dict, out_dir: str | Path, *, force: bool = False) -> ZooIndex:
    """Build (or reuse, when the spec is unchanged) the zoo of ``spec_path`` in ``out_dir``."""
    spec = _as_spec(spec_path)
    out = Path(out_dir)
    key = spec_hash(spec)
    cached = cached_index(out, key)
    if cached is not None and not force:
        return cached
    check_buildable(out)
    eval_sets = _eval_sets(spec)  # before the folder is touched: a spec asking for more examples than exist is refused
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_MARKER).write_text(key + "\n")
    (out / INDEX_FILE).unlink(missing_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        index = _build(spec, key, out, eval_sets)
    finally:
        torch.set_num_threads(threads_before)
    (out / BUILD_MARKER).unlink()
    return index


def _as_spec(spec: str | Path | ZooSpec | dict) -> ZooSpec:
    if isinstance(spec, ZooSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    return load_spec(spec)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:>6.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _eval_sets(spec: ZooSpec) -> dict[tuple[str, str], list[Example]]:
    """Every task's validation and test examples (deterministic in the spec)."""
    return {
        (name, split): task(name).eval_set(split, n, spec.max_operand, spec.eval.seed)
        for name in spec.eval.tasks
        for split, n in (("validation", spec.eval.n_validation), ("test", spec.eval.n_test))
    }


def _build(spec: ZooSpec, key: str, out: Path, eval_sets: dict[tuple[str, str], list[Example]]) -> ZooIndex:
    if spec.kernels == "portable":
        return build_in_child(spec, key, out, INDEX_FILE)
    return build_here(spec, key, out, eval_sets)


def build_here(spec: ZooSpec, key: str, out: Path, eval_sets: dict[tuple[str, str], list[Example]] | None = None) -> ZooIndex:
    """Train, score and write the zoo in this process, with whatever float kernels it already uses."""
    eval_sets = _eval_sets(spec) if eval_sets is None else eval_sets
    t_start = time.perf_counter()
    tokenizer = build_tokenizer()
    config = llama_config(
        layers=spec.model.layers, hidden=spec.model.hidden, heads=spec.model.heads, ffn=spec.model.ffn,
        max_positions=spec.model.max_positions, tokenizer_vocab=len(tokenizer),
    )
    models: list[tuple[str, str, str, LlamaForCausalLM, TrainStats]] = []
    with _progress() as progress:
        base = build_base_model(
            config, seed=spec.seed, embed_std=spec.model.embed_std, offset_norm=spec.model.offset_norm
        )
        mix = dict(spec.base.mixture)
        stats = train(
            base,
            lambda rng: base_sequence(rng, spec.max_operand, mix, spec.base.codeswitch_prob),
            train_config(spec.base, spec.seed),
            label="base",
            progress=progress,
        )
        mixture = ", ".join(f"{k} {w:g}" for k, w in mix.items() if w > 0)
        models.append(("base", "base", f"pretraining mixture ({mixture})", base, stats))
        for expert, model, stats in train_experts(spec, base, progress):
            what = " + ".join(expert.tasks)
            models.append((expert.name, "expert", f"{what} (+ {expert.replay:g} replay of the base mixture)", model, stats))
        bar = progress.add_task("scoring", total=len(models) * len(eval_sets), loss=float("nan"), tps=0.0)
        entries: list[ModelEntry] = []
        for name, role, trained_on, model, stats in models:
            scores: dict[str, dict[str, float]] = {}
            for (tname, split), examples in eval_sets.items():
                scores.setdefault(tname, {})[split] = round(accuracy(model, task(tname), examples), 2)
                progress.advance(bar)
            entries.append(
                ModelEntry(
                    name=name, folder=name, role=role, trained_on=trained_on,
                    parent=None if role == "base" else "base",
                    params=sum(p.numel() for p in model.parameters()),
                    train_steps=(spec.base if role == "base" else _expert(spec, name)).steps,
                    train_seconds=round(stats.seconds, 1), final_loss=round(stats.final_loss, 4),
                    scores=scores,
                )
            )
    for (name, _, _, model, _), entry in zip(models, entries, strict=True):
        _save(model, tokenizer, out / name, entry, spec)
    shutil.rmtree(out / "fitness", ignore_errors=True)
    fitness_tasks = write_fitness(out / "fitness", spec.eval, spec.max_operand)
    (out / SPEC_FILE).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    index = ZooIndex(
        spec_hash=key,
        build_seconds=round(time.perf_counter() - t_start, 1),
        threads=spec.threads,
        tasks=[
            TaskEntry(name=t, lm_eval_task=f"zoo_{t}", description=task(t).description)
            for t in spec.eval.tasks
        ],
        lm_eval_tasks=fitness_tasks,
        settings=[
            SettingEntry(name=s.name, description=s.description, experts=s.experts, tasks=s.tasks, target=s.target)
            for s in spec.settings
        ],
        models=entries,
    )
    index.save(out / INDEX_FILE)
    return index


def _expert(spec: ZooSpec, name: str) -> ExpertSpec:
    return next(e for e in spec.experts if e.name == name)


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path, entry: ModelEntry, spec: ZooSpec) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(entry, spec), encoding="utf-8")
