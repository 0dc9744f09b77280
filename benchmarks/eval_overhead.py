"""What scoring a candidate with lm-eval costs beyond the model's own forward passes.

Builds a random-init pico Llama shaped like the tiny zoo (hidden 128, 4 layers, ~1 M parameters
with a word-level tokenizer of ``--vocab-size`` tokens), writes a generate_until task of
``--examples`` arithmetic prompts, and times ``LmEvalFitness``: the one-time set-up, the first
evaluation (builds and tokenizes the prompts), and the steady state over ``--repeats`` evaluations
(median), read from the results' own timings: forward passes (hooks on the model) and time inside
the decoding loop, so the overhead splits into the loop around the forward passes and lm-eval plus
our side (prompts, scoring). Two decoders are timed, their evaluations interleaved (and which goes
first alternating) so load from other processes hits both alike: ResidentLM's lean greedy loop (the
default) and Hugging Face's ``generate`` (``lean_greedy=False``); their per-example scores must be
identical. The baseline is what the brief warns about: ``simple_evaluate`` with a fresh TaskManager
per call.

On a machine shared with other jobs, pass ``--threads 1``: torch's default of one thread per core
makes every small forward pass wait on a busy core, and all times balloon (tens of times over).

    python benchmarks/eval_overhead.py [--examples 200] [--batch-size 32] [--max-gen-toks 8] [--repeats 5]
                                       [--threads N] [--baseline-repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from evomerge.fitness import FitnessResult, LmEvalFitness  # noqa: E402
from evomerge.zoo.pico import build_pico  # noqa: E402

TARGET_OVERHEAD = 0.20


def build_model(folder: Path, vocab_size: int) -> tuple[torch.nn.Module, Any]:
    """A random-init pico Llama shaped like the zoo: hidden 128, 4 layers."""
    hf_logging.disable_progress_bar()
    build_pico(folder, arch="llama", hidden=128, layers=4, vocab_size=vocab_size, seed=0)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def write_task(folder: Path, examples: int, max_gen_toks: int) -> None:
    rng = random.Random(0)
    with open(folder / "bench.jsonl", "w") as f:
        for _ in range(examples):
            a, b = rng.randrange(10), rng.randrange(10)
            f.write(json.dumps({"question": f"what is {a} plus {b} ? the answer is", "answer": str(a + b)}) + "\n")
    (folder / "bench.yaml").write_text(
        "task: bench_add\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{validation: {folder / 'bench.jsonl'}}}}}\n"
        "validation_split: validation\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\n'
        f'generation_kwargs: {{until: ["?"], max_gen_toks: {max_gen_toks}}}\n'
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
    )


def baseline_seconds(model, tokenizer, folder: Path, batch_size: int, repeats: int) -> float:
    """Per-call seconds of the naive route: simple_evaluate + a new TaskManager every call."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    times = []
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        for _ in range(repeats):
            start = time.perf_counter()
            manager = TaskManager(include_path=str(folder), include_defaults=False)
            simple_evaluate(model=lm, tasks=["bench_add"], task_manager=manager, bootstrap_iters=0, log_samples=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class Timings:
    """Medians over the repeated evaluations, in seconds."""

    first: float
    total: float
    forward: float
    generate: float


def summarize(first: FitnessResult, repeats: list[FitnessResult]) -> Timings:
    def median(key: str) -> float:
        return statistics.median(r.timings[key] for r in repeats)

    return Timings(first.timings["total"], median("total"), median("forward"), median("generate"))


def report(name: str, t: Timings, examples: int, repeats: int) -> None:
    def verdict(ratio: float) -> str:
        return f"{ratio:7.1%}  (target <= {TARGET_OVERHEAD:.0%}: {'met' if ratio <= TARGET_OVERHEAD else 'missed'})"

    rows = [
        ("first evaluation (builds the prompts):", f"{t.first:7.3f} s"),
        (f"per evaluation (median of {repeats}):", f"{t.total:7.3f} s  ({examples / t.total:.0f} examples/s)"),
        ("  forward passes:", f"{t.forward:7.3f} s"),
        ("  decoding loop around them:", f"{t.generate - t.forward:7.3f} s"),
        ("  lm-eval + evomerge (outside decoding):", f"{t.total - t.generate:7.3f} s"),
        ("overhead outside forward passes / forward:", verdict((t.total - t.forward) / t.forward)),
    ]
    print(f"{name}:")
    for label, value in rows:
        print(f"  {label:<44}{value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-gen-toks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--baseline-repeats", type=int, default=2, help="0 skips the simple_evaluate baseline")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, tokenizer = build_model(folder / "model", args.vocab_size)
        n_params = sum(p.numel() for p in model.parameters())
        write_task(folder, args.examples, args.max_gen_toks)
        spec = {"include_path": str(folder), "tasks": [{"task": "bench_add"}], "batch_size": args.batch_size}

        fitness = {
            "lean greedy loop": LmEvalFitness(spec),
            "Hugging Face generate": LmEvalFitness(spec, lean_greedy=False),
        }
        first = {name: f.evaluate(model, tokenizer) for name, f in fitness.items()}
        runs: dict[str, list[FitnessResult]] = {name: [] for name in fitness}
        for i in range(args.repeats):
            for name in list(fitness)[:: 1 if i % 2 == 0 else -1]:  # alternate which decoder goes first
                runs[name].append(fitness[name].evaluate(model, tokenizer))
        baseline = (
            baseline_seconds(model, tokenizer, folder, args.batch_size, args.baseline_repeats)
            if args.baseline_repeats
            else None
        )

    results = [r for name in fitness for r in (first[name], *runs[name])]
    identical = all(r.per_example == results[0].per_example for r in results)
    timings = {name: summarize(first[name], runs[name]) for name in fitness}
    print(f"model: Llama {n_params / 1e6:.2f} M params; {args.examples} generate_until examples, "
          f"batch {args.batch_size}, up to {args.max_gen_toks} new tokens; torch threads {torch.get_num_threads()}")
    print(f"{'set-up (once):':<46}{fitness['lean greedy loop'].setup_seconds:7.3f} s")
    for name, t in timings.items():
        report(name, t, args.examples, args.repeats)
    lean, stock = timings["lean greedy loop"], timings["Hugging Face generate"]
    print(f"per-example scores identical across decoders and repeats: {identical}")
    print(f"lean loop vs generate: {stock.total / lean.total:.2f}x faster per evaluation, loop overhead "
          f"{stock.generate - stock.forward:.3f} s -> {lean.generate - lean.forward:.3f} s")
    if baseline is not None:
        print(f"baseline simple_evaluate + new TaskManager: {baseline:6.3f} s per call "
              f"({baseline / lean.total:.1f}x slower)")
    if not identical:
        raise SystemExit("the lean loop's scores differ from generate's")


if __name__ == "__main__":
    main()
