"""No bad input escapes as a traceback: property-based tests of every file a user hands evomerge.

Experiment files (``evomerge run``, ``evomerge space``), search-space files (``evomerge space``),
recipes and mergekit configs (``evomerge merge``) and zoo specs (``evomerge zoo build --spec``) are
fed random bytes, random YAML and random mutations of the project's own files (deleted keys,
swapped types, huge numbers, NaN, empty strings, deep nesting, unknown tags, unknown keys). Each
must be refused with exit code 2 and exactly one line on stderr (no traceback), creating nothing —
or, when a mutation happens to leave the file valid, be accepted: the run stops just before its run
directory would be created, the zoo build when its first model would start training (tokenizer,
evaluation sets and initial weights are built), merges and previews finish.

The command line runs in-process (``cli.main``) in a sandbox: copies of ``experiments/``,
``search_spaces/`` and ``fitness/``, pico models where the example recipe expects them, and a fake
zoo of pico models whose ``zoo.json`` matches the bundled spec (so a valid experiment never builds
a zoo). A few cases run ``python -m evomerge.cli`` to check the real exit code.
``EVOMERGE_FUZZ_EXAMPLES=500`` searches harder than the default 25 examples per property.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from evomerge import cli
from evomerge.run import session as session_module
from evomerge.zoo import build as zoo_build
from evomerge.zoo.index import ModelEntry, ZooIndex
from evomerge.zoo.pico import build_pico_family
from evomerge.zoo.spec import load_spec, spec_hash

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))
ZOO_SPECS = sorted((REPO / "evomerge" / "zoo").glob("*.yaml"))
ZOO_MODELS = {"base": "base", "expert_1": "skill_add_a", "expert_2": "lang_qa_b", "expert_3": "sort_a"}
FUZZ = settings(
    max_examples=int(os.environ.get("EVOMERGE_FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Accepted(Exception):
    """A valid experiment reached the point where its run directory would be created."""


class WouldTrain(Exception):
    """A valid zoo spec reached the training of its models."""


# -- the sandbox -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sandbox")
    for name in ("experiments", "search_spaces", "fitness"):
        shutil.copytree(REPO / name, root / name)
    build_pico_family(root / ".cache" / "pico", "llama", 2)  # what experiments/example-ties.yaml merges
    zoo = root / "zoo"
    build_pico_family(zoo, "llama", 3)
    for folder, name in ZOO_MODELS.items():
        if folder != name:
            (zoo / folder).rename(zoo / name)
    entries = [
        ModelEntry(name=name, folder=name, role="base" if name == "base" else "expert", trained_on="pico",
                   parent=None if name == "base" else "base", params=1, train_steps=1, train_seconds=0.0,
                   final_loss=0.0, scores={})
        for name in ZOO_MODELS.values()
    ]
    default = spec_hash(load_spec(REPO / "evomerge" / "zoo" / "default.yaml"))
    ZooIndex(spec_hash=default, build_seconds=0.0, threads=1, tasks=[], lm_eval_tasks=[], settings=[],
             models=entries).save(zoo / "zoo.json")
    (root / "fit.py").write_text("def score(model, tokenizer):\n    return {'x': 0.0}\n")
    return root


@pytest.fixture
def harness(sandbox, capfd, monkeypatch):
    """``harness(args)`` runs the CLI on the sandbox; a valid run or zoo build stops before it writes."""
    monkeypatch.setenv("EVOMERGE_ZOO", str(sandbox / "zoo"))
    monkeypatch.chdir(sandbox)
    prepare = session_module.prepare

    def prepare_then_stop(experiment, *args):
        prepare(experiment, *args).close()
        raise Accepted

    def no_training(*args, **kwargs):
        raise WouldTrain

    monkeypatch.setattr(session_module, "prepare", prepare_then_stop)
    monkeypatch.setattr(zoo_build, "train", no_training)
    monkeypatch.setattr(zoo_build, "build_in_child", no_training)  # a portable build trains in a child process
    capfd.readouterr()

    def run(args: list[str], *, created: Path | None = None, must_refuse: bool = False) -> str:
        try:
            code: int | str = cli.main(args)
        except Accepted:
            code = "accepted"
        except WouldTrain:
            code = "would train"
        out, err = capfd.readouterr()
        run.last_error = err
        if code == 2:
            assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
            assert created is None or not created.exists(), f"{created} was created by a refused command: {err}"
        else:
            assert not must_refuse, f"accepted: {args}"
            assert code in (0, "accepted", "would train"), (code, err)
            if created is not None and created.exists():  # a staged run makes its folder before its first stage
                shutil.rmtree(created)
        assert "Traceback" not in out + err
        return "refused" if code == 2 else "accepted"

    return run


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# -- inputs ----------------------------------------------------------------------------------------

_DEEP = 600  # past what the YAML parser can nest (Python's recursion limit); 150 parses
NAN, INF = float("nan"), float("inf")
NASTY: list[Any] = [
    None, True, 0, -1, 10**30, INF, NAN, "", " ", "x", "zoo:", "../", "\u00e9\u4e2d", [], {}, [None], [[[]]], {"": None},
]
TAGS = ["!unknown x", "!!python/object/apply:os.system ['true']", "!!binary notbase64", "!!timestamp nope", "!!int x",
        "!!float x", "!!set {a, b}", "!!omap [a, b]", "&a [*a]", "!!null x", "!!bool maybe"]


def nasty_like(value: Any) -> list[Any]:
    """Values of the same type as ``value`` that a schema may forget to bound."""
    if isinstance(value, bool):
        return [not value, "yes", 2]
    if isinstance(value, int):
        return [0, -1, -(2**31), 2**31, 2**32, 2**63, 2**64, 10**30, -(10**30), value + 1, 1.5, NAN, INF]
    if isinstance(value, float):
        return [0.0, -0.0, -1.0, 1e-320, 1e308, -1e308, INF, -INF, NAN, 10**30, value * 1e6]
    if isinstance(value, str):
        return ["", " ", "\t", "x", value + "x", value.upper(), value * 40, "zoo:", "../", "cuda", "meta", "nan", "\u00e9"]
    if isinstance(value, list):
        return [[], [None], value * 30, [value], value[:1], value[::-1]]
    if isinstance(value, dict):
        return [{}, {"": None}, {k: None for k in value}]
    return NASTY


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside ``doc`` (the root included)."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += paths(value, (*prefix, i))
    return found


def _parent(doc: Any, path: tuple) -> tuple[Any, Any]:
    for part in path[:-1]:
        doc = doc[part]
    return doc, path[-1]


def mutate(doc: Any, data: st.DataObject) -> str:
    """One to three random mutations of a parsed document, dumped back to YAML text."""
    doc = yaml.safe_load(yaml.safe_dump(doc))
    tags = []
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(paths(doc)), label="path")
        kinds = ["delete", "like", "like", "value", "swap", "unknown key", "deep", "tag"]
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if not path:
            if kind in ("value", "swap"):
                doc = copy.deepcopy(data.draw(st.sampled_from(NASTY), label="root"))
            continue
        parent, key = _parent(doc, path)
        old = parent[key]
        if kind == "delete":
            del parent[key]
        elif kind == "like":
            parent[key] = copy.deepcopy(data.draw(st.sampled_from(nasty_like(old)), label="value"))  # never a shared object
        elif kind == "value":
            parent[key] = copy.deepcopy(data.draw(st.sampled_from(NASTY), label="value"))
        elif kind == "swap":
            parent[key] = _swapped(old)
        elif kind == "unknown key" and isinstance(old, dict):
            old[data.draw(st.sampled_from(["unknwon", "x", "", "1"]), label="key")] = 1
        elif kind == "deep":
            depth = data.draw(st.sampled_from([150, _DEEP]), label="depth")
            parent[key] = f"__DEEP_{len(tags)}__"
            tags.append("[" * depth + "]" * depth)
        elif kind == "tag":
            parent[key] = f"__TAG_{len(tags)}__"
            tags.append(data.draw(st.sampled_from(TAGS), label="tag"))
        if not doc:
            break
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    for i, tag in enumerate(tags):
        text = re.sub(rf"'?__(DEEP|TAG)_{i}__'?", lambda _, tag=tag: tag, text)
    return text


def _swapped(value: Any) -> Any:
    """A value of another type carrying the same content where it can."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, str):
        return {value: value}
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values())
    return 0


def random_yaml() -> st.SearchStrategy[str]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    documents = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        max_leaves=20,
    )
    return documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)) | st.text(max_size=200)


def _documents(files: list[Path]) -> list[tuple[str, Any]]:
    return [(path.name, yaml.safe_load(path.read_text())) for path in files]


# -- experiments ---------------------------------------------------------------------------------


def _run_and_space(harness: Callable, sandbox: Path, text: bytes | str, *, must_refuse: bool = False) -> None:
    path = write(sandbox / "experiments" / "fuzzed.yaml", text)
    run = sandbox / "fuzzed-run"
    shutil.rmtree(run, ignore_errors=True)  # each example on its own, whatever an earlier one left
    harness(["run", str(path), "--run-dir", str(run), "--quiet"], created=run, must_refuse=must_refuse)
    assert not run.exists()
    harness(["space", str(path)], must_refuse=must_refuse)


@FUZZ
@given(content=st.binary(max_size=400))
@example(content=b"name: demo\nmodels: {a: \xff\xfe}\n")
@example(content=b"\xef\xbb\xbfname: \x00")
@example(content="\ufeffname: t".encode("utf-16"))
def test_random_bytes_as_an_experiment(harness, sandbox, content):
    _run_and_space(harness, sandbox, content, must_refuse=True)


@FUZZ
@given(text=random_yaml())
@example(text="[" * _DEEP + "]" * _DEEP)
@example(text="a: &x [*x]\n")
@example(text="--- {}\n--- {}\n")
@example(text="!!python/object/apply:os.system ['true']\n")
def test_random_yaml_as_an_experiment(harness, sandbox, text):
    _run_and_space(harness, sandbox, text, must_refuse=True)


@pytest.mark.parametrize("name,doc", _documents(EXPERIMENTS), ids=[p.name for p in EXPERIMENTS])
@FUZZ
@given(data=st.data())
def test_mutated_experiments(harness, sandbox, name, doc, data):
    _run_and_space(harness, sandbox, mutate(doc, data))


def test_the_project_experiments_are_accepted_unmutated(harness, sandbox):
    for path in EXPERIMENTS:
        # example-ties.yaml is a recipe, for `evomerge merge`; mistral-7b.yaml has configs and no
        # weights, for `evomerge plan` (tests/test_plan.py plans it)
        if "method" not in path.read_text() and path.name != "mistral-7b.yaml":
            run = sandbox / "r"
            assert harness(["run", str(sandbox / "experiments" / path.name), "--run-dir", str(run)], created=run) == "accepted", (
                path.name, harness.last_error)


# -- search spaces ---------------------------------------------------------------------------------


def _space(harness: Callable, sandbox: Path, text: bytes | str) -> str:
    space = write(sandbox / "search_spaces" / "fuzzed.yaml", text)
    experiment = {
        "name": "space",
        "models": {"base": "../.cache/pico/base", "a": "../.cache/pico/expert_1", "b": "../.cache/pico/expert_2"},
        "base": "base",
        "search_space": f"../search_spaces/{space.name}",
        "strategy": {"name": "random"},
        "fitness": {"python": "../fit.py:score"},
        "budget": {"evaluations": 2},
    }
    path = write(sandbox / "experiments" / "space.yaml", yaml.safe_dump(experiment))
    verdict = harness(["space", str(path), "--genome", "random"])
    if verdict == "accepted":
        harness(["run", str(path), "--run-dir", str(sandbox / "space-run")], created=sandbox / "space-run")
    return verdict


@FUZZ
@given(content=st.binary(max_size=300) | random_yaml())
def test_random_search_spaces(harness, sandbox, content):
    assert _space(harness, sandbox, content) == "refused"


@pytest.mark.parametrize("name,doc", _documents(SPACES), ids=[p.name for p in SPACES])
@FUZZ
@given(data=st.data())
def test_mutated_search_spaces(harness, sandbox, name, doc, data):
    _space(harness, sandbox, mutate(doc, data))


def test_the_project_search_spaces_are_accepted_unmutated(harness, sandbox):
    for path in SPACES:
        assert _space(harness, sandbox, path.read_text()) == "accepted"


# -- recipes and mergekit configs --------------------------------------------------------------------

MERGEKIT = [
    ("mergekit-dare-ties", {
        "merge_method": "dare_ties",
        "base_model": "../.cache/pico/base",
        "models": [
            {"model": "../.cache/pico/expert_1", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "../.cache/pico/expert_2", "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
        ],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    }),
    ("mergekit-slices", {
        "merge_method": "slerp",
        "base_model": "../.cache/pico/base",
        "slices": [{"sources": [{"model": "../.cache/pico/base", "layer_range": [0, 2]},
                                {"model": "../.cache/pico/expert_1", "layer_range": [0, 2]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5]}, {"value": 0.3}]},
        "tokenizer_source": "base",
    }),
]
RECIPES = [(path.name, yaml.safe_load(path.read_text())) for path in EXPERIMENTS if "method" in path.read_text()] + MERGEKIT


def _merge(harness: Callable, sandbox: Path, text: bytes | str, *, must_refuse: bool = False) -> str:
    path = write(sandbox / "experiments" / "recipe.yaml", text)
    out = sandbox / "merged"
    shutil.rmtree(out, ignore_errors=True)
    return harness(["merge", str(path), "--out", str(out), "--quiet"], created=out, must_refuse=must_refuse)


@FUZZ
@given(content=st.binary(max_size=300) | random_yaml())
def test_random_recipes(harness, sandbox, content):
    _merge(harness, sandbox, content, must_refuse=True)


@pytest.mark.parametrize("name,doc", RECIPES, ids=[name for name, _ in RECIPES])
@FUZZ
@given(data=st.data())
def test_mutated_recipes_and_mergekit_configs(harness, sandbox, name, doc, data):
    _merge(harness, sandbox, mutate(doc, data))


def test_the_recipes_merge_unmutated(harness, sandbox):
    for name, doc in RECIPES:
        assert _merge(harness, sandbox, yaml.safe_dump(doc)) == "accepted", name


# -- zoo specs ---------------------------------------------------------------------------------------


def _zoo(harness: Callable, sandbox: Path, text: bytes | str, *, must_refuse: bool = False) -> str:
    path = write(sandbox / "zoo-spec.yaml", text)
    out = sandbox / "zoo-out"
    shutil.rmtree(out, ignore_errors=True)
    return harness(["zoo", "build", "--spec", str(path), "--out", str(out)], created=out, must_refuse=must_refuse)


@FUZZ
@given(content=st.binary(max_size=300) | random_yaml())
def test_random_zoo_specs(harness, sandbox, content):
    _zoo(harness, sandbox, content, must_refuse=True)


@pytest.mark.parametrize("name,doc", _documents(ZOO_SPECS), ids=[p.name for p in ZOO_SPECS])
@FUZZ
@given(data=st.data())
def test_mutated_zoo_specs(harness, sandbox, name, doc, data):
    _zoo(harness, sandbox, mutate(doc, data))


def test_the_zoo_specs_reach_training_unmutated(harness, sandbox):
    for path in ZOO_SPECS:
        assert _zoo(harness, sandbox, path.read_text()) == "accepted", path.name


# -- inputs that escaped as tracebacks before --------------------------------------------------------

ESCAPED = [  # (what, file, path of the mutated value, value, words the one-line error must contain)
    ("experiment", "demo.yaml", ("seed",), -1, "seed"),
    ("experiment", "pareto-demo.yaml", ("seed",), 2**32, "seed"),
    ("experiment", "demo.yaml", ("executor", "threads"), 10**30, "executor.threads"),
    ("experiment", "demo.yaml", ("executor", "device"), "cuda:99", "executor.device"),
    ("experiment", "demo.yaml", ("zoo", "spec"), "default" * 40, "zoo.spec"),
    ("experiment", "demo.yaml", ("models", "base"), "zoo:\x00", "models.base"),
    ("space", "linear-smooth.yaml", ("kind",), {"parameter": "parameter"}, "kind"),
    ("space", "linear-smooth.yaml", ("anchors",), 2**63, "anchors"),
    ("space", "task-arithmetic-per-layer.yaml", ("model_genes", "weight", "high"), float("inf"), "high"),
    ("recipe", "mergekit-dare-ties", ("base_model",), "../.cache/pico/base\x00", "base_model"),
    ("zoo", "ci.yaml", ("seed",), 2**70, "seed"),
    ("zoo", "ci.yaml", ("max_operand",), 9, "eval.n_validation"),
]


@pytest.mark.parametrize("what,name,path,value,words", ESCAPED, ids=[f"{w}-{'.'.join(map(str, p))}" for w, _, p, _, _ in ESCAPED])
def test_inputs_that_escaped_are_refused_by_name(harness, sandbox, what, name, path, value, words):
    doc = dict(RECIPES)[name] if what == "recipe" else yaml.safe_load(
        (REPO / {"experiment": "experiments", "space": "search_spaces", "zoo": "evomerge/zoo"}[what] / name).read_text()
    )
    doc = yaml.safe_load(yaml.safe_dump(doc))
    parent, key = _parent(doc, path)
    parent[key] = value
    text = yaml.safe_dump(doc, allow_unicode=True)
    verdict = {
        "experiment": lambda: _run_and_space_verdict(harness, sandbox, text),
        "space": lambda: _space(harness, sandbox, text),
        "recipe": lambda: _merge(harness, sandbox, text),
        "zoo": lambda: _zoo(harness, sandbox, text),
    }[what]()
    assert verdict == "refused"
    assert words in harness.last_error, harness.last_error


@pytest.mark.parametrize("text", ["seed: !!int x\n", "smooth: !!bool maybe\n", "a: !!timestamp nope\n", "a: !!float x\n"])
def test_tagged_values_that_cannot_be_built_are_yaml_errors(harness, sandbox, text):
    assert _run_and_space_verdict(harness, sandbox, text) == "refused"
    assert "invalid YAML: cannot read" in harness.last_error and ":1:" in harness.last_error


def _run_and_space_verdict(harness: Callable, sandbox: Path, text: str) -> str:
    path = write(sandbox / "experiments" / "fuzzed.yaml", text)
    shutil.rmtree(sandbox / "fuzzed-run", ignore_errors=True)
    return harness(["run", str(path), "--run-dir", str(sandbox / "fuzzed-run")], created=sandbox / "fuzzed-run")


# -- the real process ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command,content",
    [
        ("run", b"name: demo\n\xff\xfe models: {}\n"),  # the hidden corpus's escape: exit 1 and a traceback
        ("merge", "[" * _DEEP + "]" * _DEEP),
    ],
)
def test_the_exit_code_and_stderr_of_the_real_command(sandbox, tmp_path, command, content):
    path = write(tmp_path / "input.yaml", content)
    args = {
        "run": ["run", str(path), "--run-dir", str(tmp_path / "run")],
        "merge": ["merge", str(path), "--out", str(tmp_path / "out")],
    }[command]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "EVOMERGE_ZOO": str(sandbox / "zoo")}
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {path}") and done.stderr.count("\n") == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.yaml"]



def test_an_alias_inside_its_own_anchor_is_one_line_and_shared_aliases_are_fine(tmp_path):
    from evomerge.errors import ConfigError
    from evomerge.validation import read_yaml

    looped = tmp_path / "looped.yaml"
    looped.write_text("search_space: &a {kind: dataflow, nested: [*a]}\n")
    with pytest.raises(ConfigError, match=r"looped.yaml: invalid YAML: an alias refers to its own anchor"):
        read_yaml(looped)
    shared = tmp_path / "shared.yaml"
    shared.write_text("a: &x {b: 1}\nc: *x\nd: [*x, *x]\n")
    assert read_yaml(shared) == {"a": {"b": 1}, "c": {"b": 1}, "d": [{"b": 1}, {"b": 1}]}
