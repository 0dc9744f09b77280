"""Running a search: set-up and resume (``session``), the loop (``loop``), the adapter from fitness
results to strategy messages (``objectives``) and the held-out scoring shared with ``evaluate``
(``heldout``).

    from evomerge.run import start_run, resume_run
    summary = start_run("experiments/demo.yaml", run_dir="runs/demo")
"""

from evomerge.run.heldout import reference_recipes
from evomerge.run.loop import Driver
from evomerge.run.session import (
    METADATA_FORMAT,
    Session,
    prepare,
    resume_run,
    start_run,
)

__all__ = ["METADATA_FORMAT", "Driver", "Session", "prepare", "reference_recipes", "resume_run", "start_run"]
