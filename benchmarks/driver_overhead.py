"""What the search driver costs per candidate, without any evaluation: ask + store + tell.

The space is a real one of about 1,000 genes: ``search_spaces/ties-per-layer.yaml`` over 4 source
models × 40 layers (968 genes; its recipes are ~46 kB of JSON). Per candidate the driver does
``ask``, ``RunStore.add_candidate`` (genome, ``Recipe.model_dump_json()``, recipe hash),
``RunStore.add_result`` (one objective + 200 per-example scores) and ``tell``; the space's
``decode`` is timed apart (it is the space's cost, not the driver's). Each strategy — cmaes
(variant auto → separable here), random, optuna tpe — runs on an empty store and on a store
already holding 10,000 candidates with results; the table prints ms per candidate, the store's
share, and the ratio to the 5 ms target (< 1 meets it). ``--optuna-history`` times TPE at 20
genes as its history grows (it re-reads all trials on every ask); ``--optuna-rdb`` times Optuna's
own SQLite storage, the alternative the run store replaced.

    python benchmarks/driver_overhead.py [--prefill 10000] [--layers 40] [--optuna-history] [--optuna-rdb]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from evomerge.search import Evaluation, Proposal, Strategy, build_strategy
from evomerge.spaces import PoolInfo, SearchSpace, load_space
from evomerge.store import RunStore

TARGET_MS = 5.0
SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "ties-per-layer.yaml"
CASES = [
    ("cmaes (auto)", "cmaes", {"variant": "auto"}, 500),
    ("random", "random", {}, 500),
    ("optuna tpe", "optuna", {"sampler": "tpe"}, 30),
]


def build_space(layers: int) -> SearchSpace:
    models = {"base": "base", **{f"expert_{i}": f"expert_{i}" for i in range(4)}}
    return load_space(SPACE, PoolInfo(models=models, base="base", num_layers=layers))


def record(store: RunStore, proposal: Proposal, recipe_json: str, n_examples: int) -> Evaluation:
    """What the driver writes for one candidate: the candidate, then its (instant) result."""
    digest = hashlib.blake2b(recipe_json.encode(), digest_size=16).hexdigest()
    store.add_candidate(proposal, recipe=recipe_json, recipe_hash=digest)
    score = -float(np.sum((proposal.genome - 0.3) ** 2))
    evaluation = Evaluation(proposal.ticket, np.array([score]), per_example=np.ones(n_examples, dtype=bool))
    store.add_result(evaluation, fitness_hash="fitness", timings={"eval": 0.0})
    return evaluation


def prefill(run_dir: Path, space: SearchSpace, n: int, n_examples: int) -> None:
    """A store holding ``n`` candidates with results, as after a long run (one recipe text reused)."""
    strategy = build_strategy("random", space.dimension, seed=123)
    recipe_json = space.decode(np.full(space.dimension, 0.5)).model_dump_json()
    with RunStore.create(run_dir, {"benchmark": "driver_overhead"}) as store:
        for _ in range(n):
            strategy.tell(record(store, strategy.ask(), recipe_json, n_examples))


def measure(
    strategy: Strategy, store: RunStore, space: SearchSpace, n: int, n_examples: int
) -> tuple[float, float, float]:
    """(driver ms, store ms, decode ms) per candidate over ``n`` candidates after a 2-candidate warm-up."""
    offset = store.last_seq
    driver, in_store, decode = [], [], []
    for i in range(n + 2):
        start = time.perf_counter()
        proposal = strategy.ask()
        asked = time.perf_counter()
        recipe_json = space.decode(proposal.genome).model_dump_json()
        decoded = time.perf_counter()
        shifted = Proposal(proposal.ticket + offset, proposal.genome, proposal.parents, proposal.info)
        evaluation = record(store, shifted, recipe_json, n_examples)
        stored = time.perf_counter()
        strategy.tell(Evaluation(proposal.ticket, evaluation.objectives, per_example=evaluation.per_example))
        told = time.perf_counter()
        if i >= 2:
            driver.append((asked - start) + (told - decoded))
            in_store.append(stored - decoded)
            decode.append(decoded - asked)
    return (statistics.fmean(driver) * 1e3, statistics.fmean(in_store) * 1e3, statistics.fmean(decode) * 1e3)


def optuna_history(genes: int, checkpoints: tuple[int, ...]) -> list[tuple[int, float]]:
    """TPE's ask + tell cost (ms) as its history grows: it re-reads every trial on each ask."""
    strategy = build_strategy("optuna", genes, seed=0, settings={"sampler": "tpe"})
    out, told = [], 0
    for size in checkpoints:
        for _ in range(size - told):
            proposal = strategy.ask()
            strategy.tell(Evaluation(proposal.ticket, np.array([-float(np.sum((proposal.genome - 0.3) ** 2))])))
        told = size
        start = time.perf_counter()
        for _ in range(10):
            proposal = strategy.ask()
            strategy.tell(Evaluation(proposal.ticket, np.array([-float(np.sum((proposal.genome - 0.3) ** 2))])))
        told += 10
        out.append((size, (time.perf_counter() - start) / 10 * 1e3))
    return out


def optuna_rdb(genes: int, n: int) -> float:
    """ms per trial (ask + tell, random sampler) with Optuna's SQLite RDB storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {f"g{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(genes)}
    with tempfile.TemporaryDirectory() as tmp:
        study = optuna.create_study(storage=f"sqlite:///{tmp}/optuna.db", sampler=optuna.samplers.RandomSampler(0))
        study.tell(study.ask(distributions), 0.0)
        start = time.perf_counter()
        for _ in range(n):
            study.tell(study.ask(distributions), 1.0)
        return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=40, help="40 layers → 968 genes")
    parser.add_argument("--examples", type=int, default=200, help="per-example scores stored per result")
    parser.add_argument("--optuna-rdb", action="store_true", help="also time Optuna's SQLite storage")
    parser.add_argument("--optuna-history", action="store_true", help="also time TPE at 20 genes as history grows")
    args = parser.parse_args()

    space = build_space(args.layers)
    print(f"driver overhead per candidate: {space.dimension} genes, target {TARGET_MS:.0f} ms (decode excluded)")
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full"
        start = time.perf_counter()
        prefill(full, space, args.prefill, args.examples)
        size_mb = (full / "run.sqlite").stat().st_size / 1e6
        print(f"prefilled {args.prefill} candidates in {time.perf_counter() - start:.1f} s ({size_mb:.0f} MB)")
        print(f"{'strategy':<14} {'store':<7} {'n':>4} {'driver ms':>10} {'of it store':>12} {'ratio':>6} {'decode ms':>10}")
        for label, name, settings, n in CASES:
            for prefilled in (False, True):
                strategy = build_strategy(name, space.dimension, seed=0, settings=settings)
                store = RunStore.open(full) if prefilled else RunStore.create(Path(tmp) / f"empty-{name}")
                with store:
                    driver, in_store, decode = measure(strategy, store, space, n, args.examples)
                where = f"{args.prefill // 1000}k" if prefilled else "empty"
                print(
                    f"{label:<14} {where:<7} {n:>4} {driver:>10.2f} {in_store:>12.2f} "
                    f"{driver / TARGET_MS:>6.2f} {decode:>10.2f}"
                )
    if args.optuna_history:
        for size, ms in optuna_history(20, (100, 500, 1000)):
            print(f"optuna tpe, 20 genes, {size} trials told: {ms:.1f} ms/candidate (ask + tell)")
    if args.optuna_rdb:
        for genes, n in ((10, 20), (space.dimension, 2)):
            print(f"optuna RDB (SQLite) storage, {genes} genes: {optuna_rdb(genes, n):.0f} ms/trial (ask + tell)")


if __name__ == "__main__":
    main()
