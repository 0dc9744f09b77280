"""Inspecting runs: Pareto fronts, hypervolume, plots, the HTML report, comparison, export, held-out scoring.

Everything here reads the run store without its lock (safe while a driver writes), except
``evaluate_candidates``, which records held-out results and so takes the run's lock.
"""

from evomerge.inspection.front import FrontMember, pareto_front
from evomerge.inspection.pareto import hypervolume, nondominated_ranks
from evomerge.inspection.run_view import RunView

__all__ = ["FrontMember", "RunView", "hypervolume", "nondominated_ranks", "pareto_front"]
