"""The ``evomerge`` command line.

Each subcommand is a thin adapter from arguments to a library call. User mistakes surface as one
line on stderr with exit code 2 (``--debug`` shows the traceback); heavy imports happen inside the
subcommands so ``evomerge --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from evomerge import __version__
from evomerge.errors import EvomergeError

def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count → bytes (powers of 1024)."""
    from evomerge.sizes import parse_size as parse

    try:
        return parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.materialize import export_merge
    from evomerge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = export_merge(
        recipe,
        args.out,
        device=args.device,
        max_shard_bytes=args.shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"wrote {out}")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from evomerge.zoo.build import build_zoo

    spec = args.spec or Path(__file__).parent / "zoo" / "default.yaml"
    index = build_zoo(spec, args.out, force=args.force)
    print(f"zoo ready at {args.out} ({len(index.models)} models)")
    return 0


def _cmd_zoo_pico(args: argparse.Namespace) -> int:
    from evomerge.zoo.pico import build_pico_family

    paths = build_pico_family(Path(args.out), args.arch, args.experts)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from evomerge.run import start_run

    start_run(
        args.experiment,
        run_dir=args.run_dir,
        budget=args.budget,
        seed=args.seed,
        progress=not args.quiet,
        overwrite=args.overwrite,
        ray_address=args.ray_address,
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from evomerge.plan.report import plan_file, print_plan

    report = plan_file(args.experiment, device_memory=args.device_memory, host_memory=args.host_memory)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_plan(report)
    return 0 if report["fits"] else 1


def _cmd_space(args: argparse.Namespace) -> int:
    from evomerge.experiment import load_experiment
    from evomerge.spaces.preview import experiment_space, parse_genome

    space = experiment_space(load_experiment(args.experiment))
    genome = parse_genome(args.genome, space, args.seed)
    print(f"dimension: {space.dimension}")
    if not args.recipe_only:
        print("genes:")
        for name, value in zip(space.gene_names, genome, strict=True):
            print(f"  {name} = {value:.4g}")
    print(f"recipe ({args.genome} genome):")
    print(space.decode(genome).to_yaml(), end="")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.run import resume_run

    resume_run(args.run_dir, progress=not args.quiet, ray_address=args.ray_address)
    return 0


def _cmd_front(args: argparse.Namespace) -> int:
    from evomerge.inspection import RunView, pareto_front
    from evomerge.inspection.front import reference_points

    view = RunView.load(args.run_dir)
    objectives = args.objectives.split(",") if args.objectives else None
    members = pareto_front(view, objectives)
    references = reference_points(view, objectives, members)
    if args.json:
        print(json.dumps({"run_dir": str(view.run_dir), "state": view.state, "objectives": objectives or view.objectives,
                          "front": [m.to_json() for m in members], "stopped_early": [r.ticket for r in view.estimates()],
                          "references": [r.to_json() for r in references]}, indent=2))
        return 0
    names = view.objectives
    stopped = len(view.estimates())
    raced = f"; {stopped} more stopped early by racing (estimates, not ranked)" if stopped else ""
    print(f"{view.name}: {len(members)} non-dominated of {len(view.ok_results())} successful candidates{raced} ({view.state})")
    for m in members:
        val = " ".join(f"{n}={m.objectives[n]:.4g}" for n in names)
        test = "" if m.heldout is None else "  test " + " ".join(f"{n}={m.heldout[n]:.4g}" for n in names)
        print(f"  #{m.candidate:<5d} {val}{test}  |  {m.summary}")
    if references:
        where = [f"{r.name} #{r.candidate} " + ("on the front" if r.dominated_by is None else f"dominated by #{r.dominated_by}")
                 for r in references]
        print("references: " + "; ".join(where))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from evomerge.inspection.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    if args.log_to:
        from evomerge.inspection.trackers import log_to

        print(f"logged to {args.log_to}: {log_to(args.log_to, args.run_dir)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from evomerge.inspection.compare import compare_runs

    out, rows = compare_runs(args.run_dirs, args.out)
    for row in rows:
        volume = "" if row["hypervolume"] is None else f", hypervolume {row['hypervolume']:.4g}"
        print(f"{row['run']}: best {row['best']:.4g} after {row['evaluations']} evaluations{volume}")
    print(f"wrote {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from evomerge.inspection.export_candidate import export_candidate

    folder, ticket, no_mergekit = export_candidate(
        args.run_dir, args.out, candidate=args.candidate, best=args.best, pick=args.pick,
        overwrite=args.overwrite, device=args.device, progress=not args.quiet,
    )
    print(f"wrote candidate {ticket} to {folder}" + ("" if no_mergekit is None else f" (no mergekit.yaml: {no_mergekit})"))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from evomerge.inspection.evaluate import evaluate_candidates

    def show(ticket: int, scores: dict[str, float] | None, error: str | None) -> None:
        text = error if scores is None else " ".join(f"{k}={v:.4g}" for k, v in scores.items())
        print(f"  #{ticket}: {text}", flush=True)

    scored = evaluate_candidates(args.run_dir, front=args.front, candidates=args.candidate, split=args.split, on_result=show)
    print(f"{len(scored)} candidate(s) scored on the {args.split} split")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from evomerge.status import print_status, run_status

    status = run_status(args.run_dir)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Search for model-merge recipes by evolution.")
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser("merge", help="merge models as a recipe (or mergekit config) says, to a folder")
    merge.add_argument("recipe", help="recipe YAML (evomerge recipe or mergekit config)")
    merge.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    merge.add_argument("--device", default="cpu", help="device for the merge arithmetic (cpu, cuda, cuda:1, mps)")
    merge.add_argument("--shard-size", type=parse_size, default="5GB", help="max safetensors shard size (default 5GB)")
    merge.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    merge.add_argument("--trust-remote-code", action="store_true", help="allow models whose config needs remote code")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(func=_cmd_merge)

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")

    run = commands.add_parser("run", parents=[debug], help="search merge recipes as an experiment file says")
    run.add_argument("experiment", help="experiment YAML (models, search space, strategy, fitness, budget)")
    run.add_argument("--run-dir", default=None, help="run directory (default: the experiment's run_dir or runs/<name>)")
    run.add_argument("--budget", type=int, default=None, help="maximum number of evaluations (overrides budget.evaluations)")
    run.add_argument("--seed", type=int, default=None, help="seed of the run and its strategy (overrides seed)")
    run.add_argument("--overwrite", action="store_true", help="replace a finished or crashed run in the run directory")
    run.add_argument("--ray-address", default=None, help="run the workers on this Ray cluster ('auto', 'ray://host:10001')")
    run.add_argument("--quiet", action="store_true", help="no live progress and no summary table")
    run.set_defaults(func=_cmd_run)

    resume = commands.add_parser("resume", parents=[debug], help="continue a stopped or crashed run")
    resume.add_argument("run_dir", help="the run directory")
    resume.add_argument("--ray-address", default=None, help="continue on this Ray cluster ('auto', 'ray://host:10001')")
    resume.add_argument("--quiet", action="store_true", help="no live progress and no summary table")
    resume.set_defaults(func=_cmd_resume)

    plan = commands.add_parser("plan", parents=[debug], help="memory of one worker: each part vs the device and host (exit 1: does not fit)")
    plan.add_argument("experiment", help="experiment YAML (or a recipe, planned as an in-memory merge)")
    plan.add_argument("--json", action="store_true", help="machine-readable output (fields in the README)")
    plan.add_argument("--device-memory", type=parse_size, default=None, help="the worker device's memory, e.g. 80GB (default: queried)")
    plan.add_argument("--host-memory", type=parse_size, default=None, help="the worker host's memory, e.g. 512GB (default: queried)")
    plan.set_defaults(func=_cmd_plan)

    space = commands.add_parser("space", parents=[debug], help="an experiment's search space: genes and a decoded recipe")
    space.add_argument("experiment", help="experiment YAML")
    space.add_argument("--genome", default="init", help="'init', 'random' or the genes as comma-separated numbers in [0, 1]")
    space.add_argument("--seed", type=int, default=0, help="seed of --genome random")
    space.add_argument("--recipe-only", action="store_true", help="print only the dimension and the recipe")
    space.set_defaults(func=_cmd_space)

    status = commands.add_parser("status", parents=[debug], help="how far a run is (works while it runs)")
    status.add_argument("run_dir", help="the run directory")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)

    front = commands.add_parser("front", parents=[debug], help="the non-dominated candidates of a run (live or finished)")
    front.add_argument("run_dir", help="the run directory")
    front.add_argument("--objectives", default=None, help="comma-separated objectives to rank on (default: all)")
    front.add_argument("--json", action="store_true", help="machine-readable output")
    front.set_defaults(func=_cmd_front)

    report = commands.add_parser("report", parents=[debug], help="write an HTML report with figures (RUN_DIR/report)")
    report.add_argument("run_dir", help="the run directory")
    report.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    report.add_argument("--log-to", default=None, choices=["tensorboard", "wandb"], help="also replay the run into a tracker (if installed)")
    report.set_defaults(func=_cmd_report)

    compare = commands.add_parser("compare", parents=[debug], help="best-so-far and hypervolume curves of several runs")
    compare.add_argument("run_dirs", nargs="+", help="run directories")
    compare.add_argument("--out", default="compare.png", help="output PNG (default: compare.png)")
    compare.set_defaults(func=_cmd_compare)

    export = commands.add_parser("export", parents=[debug], help="write one candidate as a Hugging Face folder")
    export.add_argument("run_dir", help="the run directory")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--candidate", type=int, default=None, help="candidate id")
    which.add_argument("--best", action="store_true", help="the best candidate on the first objective")
    which.add_argument("--pick", default=None, help="front member maximizing weighted objectives, e.g. 'a=0.7,b=0.3'")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    export.add_argument("--device", default="cpu", help="device for the merge arithmetic")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(func=_cmd_export)

    evaluate = commands.add_parser("evaluate", parents=[debug], help="score front members on the held-out split and store it")
    evaluate.add_argument("run_dir", help="the run directory")
    evaluate.add_argument("--front", action="store_true", help="every member of the Pareto front")
    evaluate.add_argument("--candidate", type=int, action="append", default=None, help="a candidate id (repeatable)")
    evaluate.add_argument("--split", default="test", choices=["test"], help="the held-out split (default: test)")
    evaluate.set_defaults(func=_cmd_evaluate)

    zoo = commands.add_parser("zoo", help="the project's own small model families").add_subparsers(
        dest="zoo_command", required=True, metavar="ZOO_COMMAND"
    )
    build = zoo.add_parser("build", help="train the tiny zoo (cached by the spec's hash)")
    build.add_argument("--spec", default=None, help="zoo spec YAML (default: the bundled spec)")
    build.add_argument("--out", default=os.environ.get("EVOMERGE_ZOO", ".cache/zoo"), help="zoo folder")
    build.add_argument("--force", action="store_true", help="rebuild even if the cached zoo matches the spec")
    build.set_defaults(func=_cmd_zoo_build)
    pico = zoo.add_parser("pico", help="write random-init pico models (a base and experts) for quick trials")
    pico.add_argument("--out", required=True, help="folder for the pico family")
    pico.add_argument("--arch", default="llama", help="architecture: llama, mistral, qwen2, gpt2, ...")
    pico.add_argument("--experts", type=int, default=2, help="number of experts derived from the base")
    pico.set_defaults(func=_cmd_zoo_pico)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EvomergeError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
