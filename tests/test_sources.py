"""Model references: folders, hub ids (with revisions) resolved against a Hugging Face cache laid out
as huggingface_hub writes it, and LoRA sources; pinned commits in experiments, recipes, runs and
exports; the offline error. No network: the cache is built in a temporary HF_HOME."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evomerge import cli
from evomerge.errors import ConfigError, ModelError
from evomerge.experiment import Experiment, load_experiment
from evomerge.io import TensorIndex
from evomerge.materialize import export_merge
from evomerge.pool import ModelPool
from evomerge.pool.sources import SourceSpec, is_hub_id, resolve_source, short_name
from evomerge.recipe import load_recipe, recipe_from_dict
from evomerge.recipe.mergekit_export import recipe_to_mergekit

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"


@pytest.fixture
def hub(hf_cache, pico_family):
    """``org/pico`` at two commits (tag v1: the base; main: expert_2) and ``org/expert`` (expert_1)."""
    v1 = hf_cache.publish("org/pico", pico_family["base"], revisions=("main", "v1"))
    main = hf_cache.publish("org/pico", pico_family["expert_2"], revisions=("main",))
    expert = hf_cache.publish("org/expert", pico_family["expert_1"])
    return {"cache": hf_cache, "v1": v1, "main": main, "expert": expert}


def tensors(folder_or_ref) -> dict[str, torch.Tensor]:
    with ModelPool.open({"m": folder_or_ref, "n": folder_or_ref}) as pool:
        return {name: pool.tensor("m", name) for name in pool.tensor_names}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- parsing and resolving ------------------------------------------------------------------------


def test_hub_ids_resolve_to_cached_snapshots_at_their_commit(hub, pico_family):
    snapshots = hub["cache"].repo("org/pico") / "snapshots"
    main = resolve_source("org/pico")
    assert (main.model.repo_id, main.model.revision, main.model.commit) == ("org/pico", None, hub["main"])
    assert main.path == (snapshots / hub["main"]).resolve()
    assert main.ref == f"org/pico@{hub['main']}"
    tagged = resolve_source("org/pico@v1")
    assert (tagged.model.revision, tagged.model.commit, tagged.ref) == ("v1", hub["v1"], f"org/pico@{hub['v1']}")
    by_commit = resolve_source(f"org/pico@{hub['v1']}")
    assert by_commit.path == tagged.path and by_commit.ref == tagged.ref
    assert same(tensors(tagged.ref), tensors(pico_family["base"]))
    assert same(tensors("org/pico"), tensors(pico_family["expert_2"]))
    with ModelPool.open({"old": tagged, "new": main}, "old") as pool:  # resolved sources open as they are
        assert pool.source("new") is main and pool.path("old") == tagged.path
    assert tagged.record() == {
        "ref": f"org/pico@{hub['v1']}",
        "repo_id": "org/pico",
        "revision": "v1",
        "commit": hub["v1"],
        "path": str(tagged.path),
    }


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(hub, tmp_path, pico_family):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "pico").symlink_to(pico_family["expert_1"])
    local = resolve_source("org/pico", roots=[tmp_path])
    assert local.model.repo_id is None and local.path == pico_family["expert_1"].resolve()
    assert resolve_source("./org/pico", roots=[tmp_path]).path == local.path


def test_offline_with_nothing_cached_is_one_line_naming_the_id_and_hf_hub_offline(hf_cache):
    with pytest.raises(ModelError) as info:
        resolve_source("org/nowhere@v3", where="exp.yaml: models.lang")
    message = str(info.value)
    assert message == (
        f"exp.yaml: models.lang: 'org/nowhere@v3' is not in the Hugging Face cache ({hf_cache.hub}) and "
        "HF_HUB_OFFLINE=1 forbids downloading it (nor is it a local folder)"
    )


def test_unknown_revision_or_adapter_is_not_found_offline(hub):
    with pytest.raises(ModelError, match=r"^model: 'org/pico@v2' is not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        resolve_source("org/pico@v2")
    with pytest.raises(ModelError, match=r"^model \(adapter\): 'org/math-lora@v1' is not in the Hugging Face cache"):
        resolve_source("org/pico+org/math-lora@v1")


def test_a_partly_cached_model_names_the_missing_weights(hf_cache, pico_family):
    hf_cache.publish("org/half", pico_family["base"], skip=("model.safetensors",))
    with pytest.raises(ModelError, match=r"'org/half@[0-9a-f]{40}' is only partly in the Hugging Face cache "
                       r"\(no model.safetensors\) and HF_HUB_OFFLINE=1 forbids downloading the rest"):
        resolve_source("org/half")


def test_sharded_hub_model_reads_the_shards_its_index_lists(hf_cache, make_pico):
    folder = make_pico(sharded=True, seed=4)
    hf_cache.publish("org/sharded", folder)
    assert same(tensors("org/sharded"), tensors(folder))


def test_adapter_references_and_the_mapping_form(hub, tmp_path, pico_family):
    (tmp_path / "lora").mkdir()
    text = "org/pico@v1+./lora"
    source = resolve_source(text, roots=[tmp_path])
    assert source.model.commit == hub["v1"] and source.adapter.path == (tmp_path / "lora").resolve()
    assert source.ref == f"org/pico@{hub['v1']}+{(tmp_path / 'lora').resolve()}"
    assert resolve_source({"model": "org/pico@v1", "lora": "./lora"}, roots=[tmp_path]) == source
    assert SourceSpec(model="a", lora="b").text == "a+b"
    assert resolve_source(source.ref) == resolve_source(source.ref)  # pinned refs resolve to themselves
    assert resolve_source(source.ref).ref == source.ref
    with pytest.raises(ConfigError, match=r"'org/pico\+': expected <model>\+<adapter> with both parts named"):
        resolve_source("org/pico+")


@pytest.mark.parametrize(
    ("text", "name", "hub"),
    [
        ("Qwen/Qwen2.5-7B@main", "Qwen2.5-7B", True),
        ("Qwen/Qwen2.5-7B+org/math-lora@v2", "math-lora", False),
        ("/models/base/", "base", False),
        ("./org/name", "name", False),
        ("zoo:skill_add_a", "skill_add_a", False),
    ],
)
def test_short_names_and_hub_shapes(text, name, hub):
    assert short_name(text) == name
    assert is_hub_id(text) is hub


def test_zoo_references_outside_experiments_are_refused():
    with pytest.raises(ConfigError, match=r"'zoo:base': zoo: models can be named in experiments only"):
        resolve_source("zoo:base")


def test_a_bare_adapter_folder_as_a_model_says_how_to_name_it(tmp_path, pico_family):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/pico"}))
    with pytest.raises(ModelError, match=rf"is a LoRA adapter, not a model; name the model it applies to: "
                       rf"'org/pico\+{adapter}' or \{{model: org/pico, lora: {adapter}\}}"):
        ModelPool.open({"base": pico_family["base"], "x": adapter}, "base")


# -- experiments, recipes, mergekit configs -------------------------------------------------------


def experiment_file(folder: Path, models: dict) -> Path:
    (folder / "fitness.py").write_text(
        "def score(model, tokenizer):\n"
        "    w = model.get_input_embeddings().weight\n"
        "    return {'x': float(w.detach().double().sum())}\n"
    )
    data = {
        "name": "hubrun",
        "models": models,
        "base": "base",
        "search_space": str(SPACE),
        "strategy": {"name": "random"},
        "fitness": {"python": "fitness.py:score"},
        "budget": {"evaluations": 3},
        "run_dir": "run",
    }
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_experiment_pins_hub_ids_and_records_where_they_came_from(hub, tmp_path, pico_family):
    path = experiment_file(tmp_path, {"base": "org/pico@v1", "a": "org/expert", "b": str(pico_family["expert_2"])})
    experiment = load_experiment(path)
    assert experiment.models == {
        "base": f"org/pico@{hub['v1']}",
        "a": f"org/expert@{hub['expert']}",
        "b": str(pico_family["expert_2"].resolve()),
    }
    assert experiment.origins["base"] == {
        "written": "org/pico@v1",
        "ref": f"org/pico@{hub['v1']}",
        "repo_id": "org/pico",
        "revision": "v1",
        "commit": hub["v1"],
        "path": str(resolve_source("org/pico@v1").path),
    }
    assert experiment.origins["a"]["revision"] == "main"
    again = Experiment.from_snapshot(json.loads(json.dumps(experiment.snapshot())), "snap")
    assert again == experiment


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"model": "org/pico", "lorra": "x"}, "models.a: lorra: unknown key (did you mean 'lora'?); expected model and lora"),
        ({"lora": "x"}, "models.a: model: expected a model reference, got None"),
        (7, "models.a: expected a model reference (folder, zoo:<model>, org/name[@revision], model+adapter) "
            "or {model: ..., lora: ...}, got 7"),
    ],
)
def test_malformed_model_entries_are_one_line(tmp_path, pico_family, entry, message):
    path = experiment_file(tmp_path, {"base": str(pico_family["base"]), "a": entry})
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(info.value) == f"{path}: {message}"


def test_offline_experiment_with_an_uncached_id_exits_2_before_any_run_directory(hf_cache, tmp_path, pico_family, capsys):
    path = experiment_file(tmp_path, {"base": str(pico_family["base"]), "a": "org/not-cached"})
    assert cli.main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {path}: models.a: 'org/not-cached' is not in the Hugging Face cache ({hf_cache.hub}) and "
        "HF_HUB_OFFLINE=1 forbids downloading it (nor is it a local folder)"
    )
    assert not (tmp_path / "run").exists()


def test_run_resume_and_export_use_the_commit_the_run_started_with(hub, tmp_path, pico_family, capsys):
    """main moves to new weights after the run started: the run's snapshot and its export keep the old commit."""
    path = experiment_file(tmp_path, {"base": "org/pico", "a": "org/expert", "b": str(pico_family["expert_2"])})
    assert cli.main(["run", str(path), "--quiet"]) == 0
    started = hub["main"]
    moved = hub["cache"].publish("org/pico", pico_family["expert_1"], revisions=("main",))
    assert moved != started and resolve_source("org/pico").model.commit == moved
    snapshot = yaml.safe_load((tmp_path / "run" / "experiment.yaml").read_text())
    assert snapshot["models"]["base"] == f"org/pico@{started}"
    assert snapshot["origins"]["base"]["commit"] == started and snapshot["origins"]["base"]["revision"] == "main"
    resumed = Experiment.from_snapshot(snapshot, "snap")
    assert same(tensors(resumed.models["base"]), tensors(pico_family["expert_2"]))
    assert cli.main(["resume", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "run"), "--best", "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["models"]["base"] == f"org/pico@{started}" and recipe["models"]["a"] == f"org/expert@{hub['expert']}"
    card = (out / "README.md").read_text()
    assert f"[`org/pico`](https://huggingface.co/org/pico) at commit `{started}`" in card
    assert f"`org/expert`](https://huggingface.co/org/expert) at commit `{hub['expert']}`" in card
    assert f"- `base`: `org/pico` → `org/pico@{started}`" in card  # as the experiment named it
    assert "- `b`:" not in card.split("Models as the experiment named them")[1]
    local = recipe_from_dict({**recipe, "models": {"base": str(pico_family["expert_2"]), "a": str(pico_family["expert_1"]),
                                                   "b": str(pico_family["expert_2"])}})
    export_merge(local, tmp_path / "local", progress=False)
    with TensorIndex.open(out) as ours, TensorIndex.open(tmp_path / "local") as theirs:
        assert ours.names == theirs.names
        assert all(torch.equal(ours.get(n), theirs.get(n)) for n in ours.names)


def test_recipe_and_mergekit_config_with_hub_ids(hub, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"models": {"base": "org/pico@v1", "x": {"model": "org/expert"}}, "base": "base",
                                    "method": "task_arithmetic"}))
    recipe = load_recipe(path)
    assert recipe.models == {"base": f"org/pico@{hub['v1']}", "x": f"org/expert@{hub['expert']}"}
    (tmp_path / "again.yaml").write_text(recipe.to_yaml())
    assert load_recipe(tmp_path / "again.yaml").models == recipe.models
    assert recipe_to_mergekit(recipe)["models"] == [{"model": f"org/expert@{hub['expert']}"}]
    mk = tmp_path / "mk.yaml"
    mk.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic",
        "base_model": "org/pico@v1",
        "models": [{"model": "org/expert", "parameters": {"weight": 0.5}}],
    }))
    recipe = load_recipe(mk)
    assert recipe.models == {"expert": f"org/expert@{hub['expert']}", "pico": f"org/pico@{hub['v1']}"}
    assert recipe.base == "pico" and recipe.model_parameters == {"expert": {"weight": 0.5}}


# -- online: what is asked of huggingface_hub (a stand-in for snapshot_download; no network) -------


class FakeHub:
    """``snapshot_download`` as the hub would answer it: copies the matching files of a published folder."""

    def __init__(self, root: Path, repos: dict[str, Path]) -> None:
        self.root, self.repos, self.calls = root, repos, []

    def __call__(self, repo_id, *, revision, cache_dir, allow_patterns, local_files_only):
        from fnmatch import fnmatch
        from types import SimpleNamespace

        from huggingface_hub.errors import RepositoryNotFoundError

        self.calls.append((repo_id, revision, list(allow_patterns), local_files_only))
        if repo_id not in self.repos:
            raise RepositoryNotFoundError("404 Client Error.", response=SimpleNamespace(headers={}, status_code=404, request=None))
        commit = "c" * 40
        snapshot = self.root / repo_id.replace("/", "--") / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in self.repos[repo_id].iterdir():
            if any(fnmatch(file.name, pattern) for pattern in allow_patterns) and not (snapshot / file.name).exists():
                (snapshot / file.name).symlink_to(file)
        return str(snapshot)


@pytest.fixture
def online(tmp_path, monkeypatch, make_pico):
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var)
    pickled = make_pico(seed=5)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    fake = FakeHub(tmp_path / "hub", {"org/single": make_pico(seed=3), "org/sharded": make_pico(sharded=True, seed=4),
                                      "org/pickled": pickled})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def test_online_fetches_config_and_tokenizer_then_exactly_the_listed_shards(online):
    from evomerge.pool.hub import MODEL_FILES

    source = resolve_source("org/single@v2")
    assert source.ref == "org/single@" + "c" * 40
    assert online.calls == [("org/single", "v2", list(MODEL_FILES), False), ("org/single", "c" * 40, ["model.safetensors"], False)]
    assert not any("bin" in pattern for call in online.calls for pattern in call[2])
    online.calls.clear()
    resolve_source("org/sharded")
    index = json.loads((online.repos["org/sharded"] / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and online.calls[1] == ("org/sharded", "c" * 40, shards, False)
    assert same(tensors("org/sharded@" + "c" * 40), tensors(online.repos["org/sharded"]))


def test_online_errors_are_one_line(online):
    with pytest.raises(ModelError, match=r"^models\.x: 'org/pickled@c{40}' has no safetensors weights on the Hugging Face "
                       r"Hub \(no model.safetensors; evomerge never downloads pickled \*\.bin weights"):
        resolve_source("org/pickled", where="models.x")
    with pytest.raises(ModelError, match=r"^models\.x: 'org/absent' is neither a local folder nor a repository on the "
                       r"Hugging Face Hub \(a private one needs `hf auth login`\)$"):
        resolve_source("org/absent", where="models.x")
