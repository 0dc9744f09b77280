"""What restoring an Optuna strategy checkpoint costs, now that it replays the history (no pickle).

A checkpoint holds only data (genomes, values, the order of the tells); ``load_state_dict`` builds
a fresh seeded sampler and replays every ask and tell, so a restore costs about what the sampler
spent on its asks during the run. Per sampler, this drives a strategy asynchronously (4 candidates
in flight, results told out of order) for N results on a quadratic, then times ``state_dict`` and
``load_state_dict`` and prints them beside the time the run spent in ask + tell. ``restore / run``
near 1 is the expected value; the run's own evaluations (seconds to minutes each on a GPU) are not
in the denominator, so in a real run the restore is a small fraction of the time already spent.

    python benchmarks/optuna_restore.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from evomerge.search import Evaluation, Strategy, build_strategy

CASES = [  # (label, settings, genes, results)
    ("tpe", {"sampler": "tpe"}, 20, 500),
    ("nsga2", {"sampler": "nsga2", "sampler_settings": {"population_size": 20}}, 20, 500),
    ("cmaes", {"sampler": "cmaes"}, 20, 500),
    ("random", {"sampler": "random"}, 20, 500),
    ("gp", {"sampler": "gp"}, 5, 60),
]


def drive(strategy: Strategy, n: int, ahead: int = 4) -> float:
    """Seconds spent in ask + tell for ``n`` results, ``ahead`` in flight."""
    spent = 0.0
    for _ in range(n):
        start = time.perf_counter()
        while len(strategy.outstanding) < ahead:
            strategy.ask()
        chosen = min(strategy.outstanding, key=lambda p: (p.ticket * 2654435761) % 1000003)
        value = -float(np.sum((chosen.genome - 0.3) ** 2))
        strategy.tell(Evaluation(chosen.ticket, np.array([value])))
        spent += time.perf_counter() - start
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the results")
    args = parser.parse_args()
    print(f"{'sampler':<8} {'genes':>5} {'results':>7} {'run ask+tell s':>15} {'checkpoint kB':>14} {'restore s':>10} {'restore / run':>14}")
    for label, settings, genes, n in CASES:
        n = max(10, n // 5) if args.quick else n
        strategy = build_strategy("optuna", genes, seed=0, settings=settings)
        run = drive(strategy, n)
        state = json.loads(json.dumps(strategy.state_dict()))
        restored = build_strategy("optuna", genes, seed=0, settings=settings)
        start = time.perf_counter()
        restored.load_state_dict(state)
        restore = time.perf_counter() - start
        size = len(json.dumps(state)) / 1e3
        print(f"{label:<8} {genes:>5} {n:>7} {run:>15.2f} {size:>14.0f} {restore:>10.2f} {restore / run:>14.2f}")


if __name__ == "__main__":
    main()
