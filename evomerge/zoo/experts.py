"""Fine-tuning the zoo's experts from the trained base: their data, and training several side by side.

Each expert's training depends only on the base weights, its own spec and the zoo's seed, never on
another expert, so ``spec.workers`` processes can train them at once: on a 2-core machine two
experts train in the time of one. A worker is ``python -m evomerge.zoo.experts`` (a fresh
interpreter, as a portable build's child is: nothing of the caller's torch state or ``__main__`` is
inherited) with the caller's environment — a portable build's pinned kernels apply there too — and
its thread count, so the weights are bit-identical to a one-process build (``tests/test_zoo.py``).
The base's weights and each expert's come and go as safetensors files in a temporary folder; a
worker reports every training step as a JSON line, which the caller shows on its progress bars.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from rich.progress import Progress
from safetensors.torch import load_model, save_model
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.errors import EvomergeError
from evomerge.zoo.corpus import Sequence, base_sequence, task_sequence
from evomerge.zoo.model import freeze_embeddings
from evomerge.zoo.spec import BaseSpec, ExpertSpec, ZooSpec, parse_spec
from evomerge.zoo.train import TrainConfig, TrainStats, train

Trained = tuple[ExpertSpec, LlamaForCausalLM, TrainStats]


class ExpertTrainingError(EvomergeError):
    """A worker process that fine-tunes an expert failed."""


def train_config(run: BaseSpec | ExpertSpec, seed: int) -> TrainConfig:
    """The optimiser settings of the base's or an expert's training run."""
    return TrainConfig(run.steps, run.lr, run.batch_size, run.warmup, run.weight_decay, seed)


def expert_sampler(spec: ZooSpec, expert: ExpertSpec) -> Callable[[random.Random], Sequence]:
    """An expert's training data: its tasks, and a ``replay`` share of the base mixture (which keeps
    the expert in the base's basin, so task vectors stay mergeable)."""

    def sample(rng: random.Random) -> Sequence:
        if rng.random() < expert.replay:
            return base_sequence(rng, spec.max_operand, spec.base.mixture, spec.base.codeswitch_prob)
        return task_sequence(rng, rng.choice(expert.tasks), spec.max_operand)

    return sample


def _fine_tune(spec: ZooSpec, expert: ExpertSpec, model: LlamaForCausalLM, progress: Any) -> TrainStats:
    freeze_embeddings(model)
    return train(model, expert_sampler(spec, expert), train_config(expert, spec.seed), label=expert.name, progress=progress)


def train_experts(spec: ZooSpec, base: LlamaForCausalLM, progress: Progress) -> list[Trained]:
    """Every expert of ``spec``, fine-tuned from ``base``, in spec order; ``spec.workers`` at a time."""
    if min(spec.workers, len(spec.experts)) == 1:
        trained = []
        for expert in spec.experts:
            model = copy.deepcopy(base)
            trained.append((expert, model, _fine_tune(spec, expert, model, progress)))
        return trained
    with tempfile.TemporaryDirectory(prefix="evomerge-experts-") as tmp:
        folder = Path(tmp)
        save_model(base, str(folder / "base.safetensors"))
        stats = _run_workers(spec, base.config.to_dict(), folder, progress)
        trained = []
        for expert in spec.experts:
            model = copy.deepcopy(base)
            freeze_embeddings(model)
            load_model(model, str(folder / f"{expert.name}.safetensors"))
            trained.append((expert, model, stats[expert.name]))
    return trained


def _run_workers(spec: ZooSpec, config: dict, folder: Path, progress: Progress) -> dict[str, TrainStats]:
    """Run one worker per expert, ``spec.workers`` at a time; their step reports move the bars."""
    bars = {e.name: progress.add_task(e.name, total=e.steps, loss=float("nan"), tps=0.0) for e in spec.experts}
    reports: queue.Queue[tuple[str, dict | None]] = queue.Queue()
    waiting = list(spec.experts)
    running: dict[str, subprocess.Popen] = {}
    stats: dict[str, TrainStats] = {}
    try:
        while waiting or running:
            while waiting and len(running) < spec.workers:
                expert = waiting.pop(0)
                running[expert.name] = _start(spec, expert, config, folder, reports)
            name, report = reports.get()
            if report is None:
                code = running.pop(name).wait()
                if code != 0 or name not in stats:
                    raise ExpertTrainingError(f"zoo build: the process training expert {name!r} failed "
                                              f"(exit code {code}); see its output above")
            elif "stats" in report:
                stats[name] = TrainStats(**report["stats"])
            else:
                progress.update(bars[name], **report)
    finally:
        for proc in running.values():
            proc.kill()
            proc.wait()
    return stats


def _start(spec: ZooSpec, expert: ExpertSpec, config: dict, folder: Path, reports: queue.Queue) -> subprocess.Popen:
    job = {"spec": spec.model_dump(mode="json"), "expert": expert.name, "config": config,
           "folder": str(folder), "threads": torch.get_num_threads()}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.zoo.experts"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
    except BrokenPipeError:  # the worker died at start: its exit code is reported when its output ends
        pass
    threading.Thread(target=_relay, args=(expert.name, proc.stdout, reports), daemon=True).start()
    return proc


def _relay(name: str, lines: IO[str], reports: queue.Queue) -> None:
    """Pass a worker's step reports on; anything else it prints goes to stderr; None when it ends."""
    try:
        for line in lines:
            try:
                report = json.loads(line)
            except json.JSONDecodeError:
                report = None
            if isinstance(report, dict):
                reports.put((name, report))
            else:
                sys.stderr.write(line)
    finally:
        reports.put((name, None))


class _StepReports:
    """The part of a rich ``Progress`` that ``train`` uses, written as JSON lines for the caller."""

    def add_task(self, description: str, **_: Any) -> str:
        return description

    def update(self, task: str, advance: float = 0, **fields: Any) -> None:
        print(json.dumps({"advance": advance, **fields}), flush=True)


def _worker() -> None:
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job["threads"])
    spec = parse_spec(job["spec"])
    expert = next(e for e in spec.experts if e.name == job["expert"])
    folder = Path(job["folder"])
    model = LlamaForCausalLM(LlamaConfig.from_dict(job["config"]))
    load_model(model, str(folder / "base.safetensors"))
    stats = _fine_tune(spec, expert, model, _StepReports())
    save_model(model, str(folder / f"{expert.name}.safetensors"))
    print(json.dumps({"stats": {"final_loss": stats.final_loss, "tokens": stats.tokens, "seconds": stats.seconds}}), flush=True)


if __name__ == "__main__":
    _worker()
