"""The first test to run on a machine with a GPU: a 2-worker Ray search of the pico family on CUDA in
bfloat16 scores exactly the weights the CPU export writes for each candidate.

Each worker merges in float32 on its GPU and casts once into the bfloat16 model; the fitness is a
checksum of the live weights' bytes, so the run store records, per candidate, which bits the GPU
produced. Each candidate is then exported on the CPU (float32 merge, one cast to bfloat16) and
the checksums must be equal. ``pytest -m gpu`` runs it; without CUDA it is skipped. Its CPU twin
(the same search with ``device: cpu``) runs everywhere, so every line of it is exercised here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.materialize import export_merge
from evomerge.recipe import recipe_from_dict
from evomerge.run import start_run
from evomerge.store import RunStore

REPO = Path(__file__).resolve().parents[1]

CHECKSUM = '''
import hashlib


def checksum(state):
    digest = hashlib.blake2b(digest_size=6)
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return float(int.from_bytes(digest.digest(), "little"))  # 48 bits: exact as a float


def score(model, tokenizer):
    return {"checksum": checksum(model.state_dict())}
'''


def search_then_export(device: str, family: dict[str, Path], folder: Path) -> list[tuple[float, float]]:
    """(checksum the workers scored, checksum of the CPU export) per candidate of a 2-worker search."""
    import importlib.util

    (folder / "weights.py").write_text(CHECKSUM)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    executor = {"kind": "ray", "workers": 2, "num_cpus": 2, "threads": 1, "device": device, "dtype": "bfloat16"}
    if device == "cuda":
        executor["worker_gpus"] = 1 if gpus >= 2 else 0.5  # one GPU each, or both on the only one
    experiment = {
        "name": f"smoke-{device}", "models": {k: str(v) for k, v in family.items()}, "base": "base",
        "search_space": str(REPO / "search_spaces" / "ties-per-layer.yaml"), "strategy": {"name": "random"},
        "fitness": {"python": "weights.py:score"}, "budget": {"evaluations": 6}, "executor": executor,
    }
    path = folder / "smoke.yaml"
    path.write_text(yaml.safe_dump(experiment))
    start_run(path, run_dir=folder / "run", progress=False)
    spec = importlib.util.spec_from_file_location("weights", folder / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    pairs = []
    from safetensors.torch import load_file

    with RunStore.open_reader(folder / "run") as store:
        for result in store.results():
            assert result.ok, result.error
            candidate = store.candidate(result.ticket)
            recipe = recipe_from_dict(candidate.recipe, "store").model_copy(update={"dtype": "bfloat16"})
            out = export_merge(recipe, folder / f"export-{result.ticket}", progress=False)
            exported = load_file(out / "model.safetensors")
            pairs.append((float(result.evaluation.objectives[0]), weights.checksum(exported)))
    assert len(pairs) == 6
    return pairs


@pytest.mark.slow
def test_two_cpu_workers_in_bfloat16_score_what_the_export_writes(pico_family, tmp_path):
    pairs = search_then_export("cpu", pico_family, tmp_path)
    assert all(scored == exported for scored, exported in pairs), pairs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_gpu_workers_in_bfloat16_score_what_the_cpu_export_writes(pico_family, tmp_path):
    pairs = search_then_export("cuda", pico_family, tmp_path)
    assert all(scored == exported for scored, exported in pairs), pairs
