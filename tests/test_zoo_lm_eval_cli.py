"""A zoo model loads in the lm-eval CLI as it is, and the CLI scores it exactly as the zoo's scorer.

The zoo's table and ``zoo.json`` scores come from the batched scorer in ``evomerge.zoo.quick_eval``;
the searches score with lm-eval. This runs ``python -m lm_eval`` on a built zoo model with the zoo's
own task folder and compares every generation and every exact-match verdict with the zoo scorer.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from test_zoo import tiny_spec
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.zoo.build import build_zoo
from evomerge.zoo.languages import ANS, BOS, vocabulary
from evomerge.zoo.quick_eval import exact_match, generate_greedy, max_gen_tokens
from evomerge.zoo.spec import parse_spec
from evomerge.zoo.tasks import task

N_TEST = 20


def test_lm_eval_cli_matches_the_zoo_scorer(tmp_path: Path) -> None:
    run = {"lr": 0.01, "batch_size": 16, "warmup": 1}
    spec = tiny_spec(
        model={"layers": 1, "hidden": 32, "heads": 2, "ffn": 64},
        experts=[{**run, "name": "skill", "tasks": ["add_a"], "steps": 60}, {**run, "name": "lang", "tasks": ["qa_b"], "steps": 2}],
        eval={"tasks": ["add_a", "add_b"], "n_validation": 4, "n_test": N_TEST},
    )
    parsed = parse_spec(spec)
    zoo = tmp_path / "zoo"
    index = build_zoo(spec, zoo)
    folder = zoo / "skill"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
        "--include_path", str(zoo / "fitness"), "--tasks", "zoo_add_a,zoo_add_b", "--device", "cpu",
        "--batch_size", "8", "--log_samples", "--output_path", str(tmp_path / "lm_eval"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = {t: i for i, t in enumerate(vocabulary())}
    distinct = set()
    for name in ("add_a", "add_b"):
        (samples_file,) = glob.glob(str(tmp_path / "lm_eval" / "*" / f"samples_zoo_{name}_*.jsonl"))
        samples = sorted((json.loads(line) for line in Path(samples_file).read_text().splitlines()), key=lambda s: s["doc_id"])
        examples = task(name).eval_set("test", N_TEST, parsed.max_operand, parsed.eval.seed)
        assert [s["doc"]["answer"] for s in samples] == [" ".join(e.answer) for e in examples]
        prompts = [[ids[BOS], *(ids[t] for t in e.prompt), ids[ANS]] for e in examples]
        generations = [tokenizer.decode(g) for g in generate_greedy(model, prompts, max_gen_tokens(task(name)))]
        assert [s["filtered_resps"][0].strip() for s in samples] == generations
        verdicts = exact_match(model, task(name), examples)
        assert [bool(s["exact_match"]) for s in samples] == verdicts
        assert index.model("skill").scores[name]["test"] == round(100.0 * sum(verdicts) / N_TEST, 2)
        distinct.update(generations)
    assert len(distinct) >= 3  # the model answers differently across prompts: a comparison with teeth
