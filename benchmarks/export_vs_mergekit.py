"""Streamed export: `evomerge merge` vs `mergekit-yaml` on the same config, and export peak memory.

Builds (once, cached under .cache/bench) a ~100 M-parameter float32 Llama base and three experts,
then for a linear and a TIES mergekit config times both CLIs end to end in fresh processes (so both
pay their start-up), and reads each process's peak resident memory from ``wait4``. The memory an
export *adds* is its peak minus the peak of the same command merging pico models (the cost of the
Python + torch process itself), which should not grow with the number of sources.

    python benchmarks/export_vs_mergekit.py [--hidden 768] [--layers 10] [--skip-mergekit]
        [--methods linear,ties,model_stock,slerp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from evomerge.zoo.pico import build_pico, build_pico_family

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``cmd`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def family(root: Path, hidden: int, layers: int, vocab: int) -> dict[str, Path]:
    if not (root / "expert_3" / "config.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        build_pico_family(root, "llama", 3, hidden=hidden, layers=layers, vocab_size=vocab)
    return {name: root / name for name in ("base", "expert_1", "expert_2", "expert_3")}


def configs(models: dict[str, Path], sources: int = 3) -> dict[str, dict]:
    """mergekit configs of each method over ``sources`` experts (model stock: at least 2; SLERP: 1)."""
    experts = [{"model": str(models[k]), "parameters": {"weight": w, "density": d}}
               for k, w, d in (("expert_1", 0.5, 0.5), ("expert_2", 0.3, 0.6), ("expert_3", 0.2, 0.7))]
    linear = [{"model": e["model"], "parameters": {"weight": e["parameters"]["weight"]}} for e in experts]
    base = str(models["base"])
    return {
        "linear": {"merge_method": "linear", "models": linear[:sources], "dtype": "float32"},
        "ties": {"merge_method": "ties", "base_model": base, "models": experts[:sources], "dtype": "float32"},
        "model_stock": {"merge_method": "model_stock", "base_model": base,
                        "models": [{"model": e["model"]} for e in experts[: max(2, sources)]], "dtype": "float32"},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": experts[0]["model"]}],
                  "parameters": {"t": 0.3}, "dtype": "float32"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--methods", default="linear,ties", help="comma-separated: linear, ties, model_stock, slerp")
    args = parser.parse_args()
    work = ROOT / ".cache" / "bench"
    models = family(work / f"llama-{args.hidden}x{args.layers}", args.hidden, args.layers, args.vocab)
    size_mb = sum(f.stat().st_size for f in models["base"].glob("*.safetensors")) / 2**20
    print(f"models: base + 3 experts, {size_mb:.0f} MB each (float32)")

    pico = work / "pico-base"
    if not (pico / "config.json").is_file():
        build_pico(pico)
    tiny = work / "pico.yaml"
    tiny.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(pico), "parameters": {"weight": 1.0}}]}))
    _, floor = run([str(BIN / "evomerge"), "merge", str(tiny), "--out", str(work / "out-pico"), "--overwrite", "--quiet"])
    print(f"process floor (evomerge merging a pico model): {floor:.0f} MB peak RSS")

    one_source = configs(models, sources=1)
    every = configs(models)
    for method in args.methods.split(","):
        config = every[method]
        path = work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(config))
        ours, peak = run([str(BIN / "evomerge"), "merge", str(path), "--out", str(work / f"out-{method}"), "--overwrite", "--quiet"])
        single = work / f"{method}-1.yaml"
        single.write_text(yaml.safe_dump(one_source[method]))
        _, single_peak = run([str(BIN / "evomerge"), "merge", str(single), "--out", str(work / f"out-{method}-1"), "--overwrite", "--quiet"])
        shutil.rmtree(work / f"out-{method}-1", ignore_errors=True)
        line = (f"{method:7s} evomerge {ours:6.1f} s  adds {peak - floor:5.0f} MB over the floor "
                f"(fewest sources: {single_peak - floor:4.0f} MB; target <= 300)")
        if not args.skip_mergekit:
            theirs, their_peak = run([str(BIN / "mergekit-yaml"), str(path), str(work / f"mk-{method}")])
            line += f" | mergekit-yaml {theirs:6.1f} s ({their_peak:.0f} MB peak)  speed-up {theirs / ours:4.1f}x (target >= 2x)"
            shutil.rmtree(work / f"mk-{method}", ignore_errors=True)
        print(line, flush=True)


if __name__ == "__main__":
    main()
