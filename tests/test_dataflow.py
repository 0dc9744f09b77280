"""Data-flow merging: the space's decode, the path assembled by reference, the KV cache of repeated
layers, the export that folds the scales into the weights, and max-length failures.

Pico families have 3 layers here so that paths can repeat, skip and reorder layers.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.errors import ConfigError
from evomerge.fitness.lm import StopStrings, greedy_generate
from evomerge.materialize import Materializers, PathAssembler, ResidentMerger, export_merge
from evomerge.materialize.path_export import FOLD_RULES, fold_rule
from evomerge.pool import ModelPool
from evomerge.recipe import Hop, LayerPath, Recipe, load_recipe, recipe_from_dict
from evomerge.recipe.mergekit_export import recipe_to_mergekit
from evomerge.spaces import PoolInfo, build_space

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from evomerge.zoo.pico import build_pico_family

    return build_pico_family(tmp_path_factory.mktemp("dfs"), "llama", 2, layers=3)


@pytest.fixture(scope="module")
def models(family):
    return {"a": str(family["expert_1"]), "b": str(family["expert_2"])}


@pytest.fixture(scope="module")
def assembler(models):
    pool = ModelPool.open(models)
    yield PathAssembler.load(pool)
    pool.close()


def path(models, hops, **kw) -> LayerPath:
    return LayerPath(models=models, embeddings=kw.pop("embeddings", "a"), hops=[Hop(model=m, layer=i, scale=s) for m, i, s in hops], **kw)


def space(spec, n_layers=3, models=("a", "b")):
    info = PoolInfo({m: f"/nowhere/{m}" for m in models}, None, n_layers)
    return build_space({"kind": "dataflow", **spec}, info)


# -- the space ---------------------------------------------------------------------------------------


def test_decode_turns_on_slots_in_order_with_slot_scales():
    s = space({"repeats": 2, "scaling": "slot", "scale_range": [0.5, 2.0]})
    assert s.dimension == 2 * (2 * 3 * 2)  # T = M·r = 12 slots, one indicator and one scale each
    x = np.full(s.dimension, 0.2)
    on = {1: 1.0, 3: 0.0, 4: 0.5, 6: 0.75}  # slot -> its scale gene (log-uniform over [0.5, 2])
    for slot, gene in on.items():
        x[slot] = 0.9
        x[12 + slot] = gene
    decoded = s.decode(x)
    assert [(h.model, h.layer) for h in decoded.hops] == [("a", 1), ("b", 0), ("b", 1), ("a", 0)]
    assert [h.scale for h in decoded.hops] == pytest.approx([2.0, 0.5, 1.0, math.sqrt(2.0)])
    assert decoded.hops[2].scale == 1.0  # exactly: the middle gene is the unscaled hop
    assert s.decode(np.full(s.dimension, 0.5)).hops == []  # a slot is on strictly above the middle


def test_decode_scales_by_the_transition_matrix_and_fixes_the_ends():
    s = space({"repeats": 1, "scaling": "matrix", "fixed_ends": True, "embeddings": "b"})
    m = 6  # layers of both models
    x = np.full(s.dimension, 0.25)
    x[s.n_slots :] = s._one  # every W entry 1
    x[[1, 3]] = 0.9  # slots a.1 and b.0
    w = lambda i, j: s.n_slots + i * m + j  # noqa: E731  (the gene of W[i, j])
    x[w(3 + 0, 1)] = 1.0  # b.0 -> a.1: scale 2
    x[w(1, 3 + 0)] = 0.0  # a.1 -> b.0: scale 0.5
    x[w(3 + 0, 3 + 2)] = 1.0  # b.0 -> b.2: the fixed last hop is scaled by W too
    x[w(1, 3 + 2)] = 0.0  # a.1 -> b.2: not a transition of this path
    decoded = s.decode(x)
    assert [(h.model, h.layer, h.scale) for h in decoded.hops] == [("b", 0, 1.0), ("a", 1, 2.0), ("b", 0, 0.5), ("b", 2, 2.0)]
    assert decoded.embeddings == decoded.head_model == "b"


def test_initial_point_and_references_are_the_models_alone():
    s = space({"repeats": 3, "scaling": "slot", "fixed_ends": True, "embeddings": "a"})
    own = [Hop(model="a", layer=i) for i in range(3)]
    assert s.decode(s.initial_genome()).hops == own  # the search starts from the embeddings model itself
    refs = {r.name: r for r in s.layout.references}
    assert refs["a"].genome is not None and s.decode(refs["a"].genome) == s.reference("a")
    assert refs["b"].genome is None  # b alone needs b's embeddings: built directly
    assert s.reference("b").hops == [Hop(model="b", layer=i) for i in range(3)] and s.reference("b").embeddings == "b"
    genes = s.layout.genes
    assert (genes[4].name, genes[4].parameter, genes[4].model, genes[4].layers) == ("on[b.1]/r0", "indicator", "b", (1,))
    assert genes[s.n_slots].parameter == "scale" and s.layout.initial[s.n_slots] == s._one


def test_space_refuses_bad_settings_with_one_line():
    with pytest.raises(ConfigError, match=r"embeddings: 'c' is not a model"):
        space({"embeddings": "c"})
    with pytest.raises(ConfigError, match=r"scale_range"):
        space({"scale_range": [0.0, 2.0]})


# -- assembling ------------------------------------------------------------------------------------------


def test_identity_path_reproduces_each_source_exactly(assembler, models):
    for name, folder in models.items():
        assembler.apply(path(models, [(name, i, 1.0) for i in range(3)], embeddings=name))
        reference = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            assert torch.equal(assembler.model(IDS).logits, reference(IDS).logits)


def test_a_path_links_the_resident_layers_by_reference(assembler, models):
    assembler.apply(path(models, [("a", 0, 1.0), ("b", 2, 1.3), ("a", 0, 0.8), ("b", 1, 1.0)]))
    hops = assembler.model.model.layers
    sources = {m: assembler.sources[m].model.layers for m in models}
    for hop, (m, i) in zip(hops, [("a", 0), ("b", 2), ("a", 0), ("b", 1)]):
        for (name, p), (_, q) in zip(hop.named_parameters(), sources[m][i].named_parameters()):
            assert p is q, name  # the very tensors of the source layer: no copy
    assert [h.self_attn.layer_idx for h in hops] == [0, 1, 2, 3]  # one KV-cache slot per hop
    assert [layer.self_attn.layer_idx for layer in sources["a"]] == [0, 1, 2]  # the sources are untouched
    assert assembler.model.config.num_hidden_layers == 4 and assembler.sources["a"].config.num_hidden_layers == 3
    assert assembler.model.model.embed_tokens is assembler.sources["a"].model.embed_tokens


def copied_model(models, hops):
    """The reference a path must equal: a real model of the path's length whose layers are deep copies."""
    config = AutoConfig.from_pretrained(models["a"])
    config.num_hidden_layers = len(hops)
    model = AutoModelForCausalLM.from_config(config)
    sources = {m: AutoModelForCausalLM.from_pretrained(f) for m, f in models.items()}
    model.model.embed_tokens.load_state_dict(sources["a"].model.embed_tokens.state_dict())
    model.model.norm.load_state_dict(sources["a"].model.norm.state_dict())
    model.lm_head.load_state_dict(sources["a"].lm_head.state_dict())
    for position, (m, i) in enumerate(hops):
        layer = copy.deepcopy(sources[m].model.layers[i])
        layer.self_attn.layer_idx = position
        model.model.layers[position] = layer
    return model.eval()


def test_repeated_layers_generate_with_a_kv_cache_like_copied_layers(assembler, models):
    hops = [("a", 0), ("a", 1), ("a", 0), ("b", 1), ("a", 1), ("a", 2)]
    assembler.apply(path(models, [(m, i, 1.0) for m, i in hops]))
    reference = copied_model(models, hops)
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        ours = assembler.model.generate(IDS, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        theirs = reference.generate(IDS, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        lean = greedy_generate(assembler.model, IDS, mask, IDS.shape[1] + 12, StopStrings([], None, str, 2), pad_token_id=0, eos_token_ids=frozenset())
        stepped = assembler.model(theirs[:, :-1]).logits
        assert torch.equal(stepped, reference(theirs[:, :-1]).logits)
    assert torch.equal(ours, theirs) and torch.equal(lean, theirs)
    assert len(set(theirs[0, IDS.shape[1]:].tolist())) > 1  # it generates a varied sequence: a comparison with teeth


def test_a_hop_divides_its_sublayer_outputs_by_the_cumulative_scale(assembler, models):
    assembler.apply(path(models, [("a", 0, 1.0), ("b", 1, 0.5), ("a", 2, 4.0)]))
    layers = assembler.model.model.layers
    seen: dict[str, torch.Tensor] = {}
    handles = [
        layers[2].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.setdefault("down", out)),
        layers[2].mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.setdefault("into", args[0])),
    ]
    with torch.no_grad():
        scaled = assembler.model(IDS).logits
        plain = torch.nn.functional.linear(seen["into"], layers[2].mlp.down_proj.weight)
    for handle in handles:
        handle.remove()
    assert torch.equal(seen["down"], plain * (1.0 / 2.0))  # C_3 = 1 · 0.5 · 4 = 2
    assembler.apply(path(models, [("a", 0, 1.0), ("b", 1, 1.0), ("a", 2, 1.0)]))
    with torch.no_grad():
        assert not torch.allclose(assembler.model(IDS).logits, scaled, atol=1e-3)


# -- exporting --------------------------------------------------------------------------------------------

FOLD_HOPS = [("a", 0, 1.1), ("b", 1, 1.6), ("a", 1, 0.7), ("a", 1, 1.4), ("b", 2, 0.6)]


def _without_eps(models: dict[str, str]) -> None:
    """Set the norms' ε of ``models`` to 1e-30 (in place): the fold is then exact up to float rounding."""
    for folder in models.values():
        config = json.loads((Path(folder) / "config.json").read_text())
        for key in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
            if key in config:
                config[key] = 1e-30
        (Path(folder) / "config.json").write_text(json.dumps(config))


def _logits(models: dict[str, str], scaled: LayerPath, *, fold: bool = True) -> torch.Tensor:
    """The path's logits, folded as exported (``fold``) or with each hop's input multiplied by s_j (Sakana)."""
    with ModelPool.open(models) as pool:
        assembled = PathAssembler.load(pool)
        if not fold:
            assembled._fold = None
        assembled.apply(scaled)
        with torch.no_grad():
            return assembled.model(IDS).logits


@pytest.mark.parametrize("arch", sorted(FOLD_RULES))
def test_the_export_is_the_scored_model_and_folding_is_exact_but_for_eps(arch, tmp_path):
    from evomerge.zoo.pico import build_pico_family

    family = build_pico_family(tmp_path / "family", arch, 2, layers=3)
    models = {"a": str(family["expert_1"]), "b": str(family["expert_2"])}
    scaled = path(models, FOLD_HOPS)
    exported = AutoModelForCausalLM.from_pretrained(export_merge(scaled, tmp_path / "out", progress=False))
    assert exported.config.num_hidden_layers == len(FOLD_HOPS)
    with torch.no_grad():
        shipped = exported(IDS).logits
    scored = _logits(models, scaled)
    assert (scored - shipped).abs().max() <= 1e-6  # what a run scores is what it ships, up to float rounding
    assert (scored - _logits(models, path(models, [(m, i, 1.0) for m, i, _ in FOLD_HOPS]))).abs().max() > 1e-3
    _without_eps(models)  # the derivation: folding = scaling each hop's input, but for the norms' ε
    assert (_logits(models, scaled) - _logits(models, scaled, fold=False)).abs().max() <= 1e-6


def test_with_its_eps_scaling_inputs_differs_from_the_fold_by_the_eps_term_only(models):
    """Default ε (1e-6 on a pico stream of mean square ~4e-4): scaling each hop's input (Sakana's
    definition) and the folded path (what evomerge scores and exports) differ by ~1e-4 of the
    logits, and no argmax changes."""
    scaled = path(models, FOLD_HOPS)
    folded, inputs = _logits(models, scaled), _logits(models, scaled, fold=False)
    assert 1e-6 < (folded - inputs).abs().max() <= 1e-3
    assert torch.equal(folded.argmax(-1), inputs.argmax(-1))


def test_export_writes_layers_in_path_order_and_a_mergekit_config_when_unscaled(models, assembler, tmp_path):
    plain = path(models, [("a", 0, 1.0), ("a", 1, 1.0), ("b", 1, 1.0), ("b", 2, 1.0), ("a", 2, 1.0)], head="a")
    out = export_merge(plain, tmp_path / "out", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(out)
    assembler.apply(plain)
    with torch.no_grad():
        assert torch.equal(exported(IDS).logits, assembler.model(IDS).logits)  # no scale: bit for bit
    sources = {m: AutoModelForCausalLM.from_pretrained(f) for m, f in models.items()}
    assert torch.equal(exported.model.layers[3].mlp.down_proj.weight, sources["b"].model.layers[2].mlp.down_proj.weight)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    config = recipe_to_mergekit(plain)
    assert config == {
        "slices": [
            {"sources": [{"model": models["a"], "layer_range": [0, 2]}]},
            {"sources": [{"model": models["b"], "layer_range": [1, 3]}]},
            {"sources": [{"model": models["a"], "layer_range": [2, 3]}]},
        ],
        "merge_method": "passthrough",
    }
    (tmp_path / "mergekit.yaml").write_text(yaml.safe_dump(config))
    loaded = load_recipe(tmp_path / "mergekit.yaml")  # evomerge reads the config back as the path
    assert [(loaded.models[h.model], h.layer) for h in loaded.hops] == [(models[h.model], h.layer) for h in plain.hops]
    with pytest.raises(ConfigError, match="cannot scale"):
        recipe_to_mergekit(path(models, FOLD_HOPS))
    with pytest.raises(ConfigError, match="head from the last slice's"):
        recipe_to_mergekit(path(models, [("a", 0, 1.0), ("b", 2, 1.0)]))


def test_a_head_from_another_tied_model_is_exported_untied(tmp_path):
    from evomerge.zoo.pico import build_pico_family

    family = build_pico_family(tmp_path / "tied", "llama", 2, layers=2, tied=True)
    models = {"a": str(family["expert_1"]), "b": str(family["expert_2"])}
    crossed = path(models, [("a", 0, 1.0), ("b", 1, 1.2)], head="b")
    with ModelPool.open(models) as pool:
        assembled = PathAssembler.load(pool)
        assembled.apply(crossed)
        out = export_merge(crossed, tmp_path / "out", progress=False)
        exported = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            ours, theirs = assembled.model(IDS).logits, exported(IDS).logits
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert (ours - theirs).abs().max() <= 1e-6
    b_embeddings = AutoModelForCausalLM.from_pretrained(models["b"]).model.embed_tokens.weight
    assert torch.equal(exported.lm_head.weight, b_embeddings)


def test_unfoldable_architectures_and_bad_paths_are_refused(models, tmp_path):
    scaled = path(models, FOLD_HOPS)
    with pytest.raises(ConfigError, match=r"model_type 'olmo2' .* MLP reads the residual stream"):
        fold_rule(scaled, "olmo2")
    with pytest.raises(ConfigError, match=r"model_type 'bert'"):
        fold_rule(scaled, "bert")
    assert fold_rule(path(models, [("a", 0, 1.0)]), "olmo2").divide == ()  # unscaled: nothing to fold
    with pytest.raises(ConfigError, match=r"model 'b' has 3 layers, there is no layer 7"):
        export_merge(path(models, [("b", 7, 1.0)]), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match=r"hops\[0\].model: 'c' is not one of the models"):
        recipe_from_dict({"kind": "path", "models": models, "embeddings": "a", "hops": [{"model": "c", "layer": 0}]})
    with pytest.raises(ConfigError, match=r"scale"):
        recipe_from_dict({"kind": "path", "models": models, "embeddings": "a", "hops": [{"model": "a", "layer": 0, "scale": -1}]})
    assert not (tmp_path / "x").exists()


# -- max length, kinds and the worker ----------------------------------------------------------------------


def test_too_long_and_empty_paths_fail_with_their_reason(assembler, models, tmp_path):
    long = path(models, [("a", 0, 1.0)] * 5, max_layers=4)
    with pytest.raises(ConfigError, match=r"^path: 5 hops exceed max_layers 4$"):
        assembler.apply(long)
    with pytest.raises(ConfigError, match=r"no layer selected"):
        assembler.apply(path(models, []))
    with pytest.raises(ConfigError, match=r"exceed max_layers"):
        export_merge(long, tmp_path / "long", progress=False)
    assert recipe_from_dict(json.loads(long.model_dump_json())) == long  # a failing path is still a valid blueprint


def test_materializers_switch_kinds_one_at_a_time(models, family):
    pool = ModelPool.open({"base": str(family["base"]), **models}, "base")
    chosen = Materializers(pool)
    with pool:
        model = chosen.apply(path({"base": str(family["base"]), **models}, [("a", 0, 1.0), ("a", 1, 1.0), ("a", 2, 1.0)]))
        assert isinstance(chosen._current, PathAssembler)
        with torch.no_grad():
            by_path = model(IDS).logits
        recipe = Recipe(models={"base": str(family["base"]), **models}, base="base", method="linear", sources=["a"], model_parameters={"a": {"weight": 1.0}})
        model = chosen.apply(recipe)
        assert isinstance(chosen._current, ResidentMerger)
        with torch.no_grad():
            assert torch.allclose(model(IDS).logits, by_path, atol=1e-6)  # expert a alone, either way
        chosen.close()


# -- a data-flow run end to end ----------------------------------------------------------------------------

FITNESS = """
import torch

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12]])


def fit(model, tokenizer):
    with torch.no_grad():
        logits = model(IDS).logits[0, :-1].double()
    return {"fit": float(torch.log_softmax(logits, -1).gather(-1, IDS[0, 1:, None]).mean())}
"""


def dataflow_experiment(tmp_path: Path, models: dict[str, str], **space) -> Path:
    (tmp_path / "fitness.py").write_text(FITNESS)
    data = {
        "name": "dfs",
        "seed": 1,
        "models": models,
        "search_space": {"kind": "dataflow", "repeats": 2, "scaling": "slot", "max_layers": 5, **space},
        "strategy": {"name": "cmaes", "settings": {"sigma0": 0.3, "popsize": 6}},
        "fitness": {"python": "fitness.py:fit"},
        "heldout": {"python": "fitness.py:fit"},
        "budget": {"evaluations": 18},
    }
    path = tmp_path / "dfs.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_dataflow_run_records_paths_fails_long_ones_and_exports_its_best(models, tmp_path):
    from evomerge.inspection import pareto_front
    from evomerge.inspection.export_candidate import export_candidate
    from evomerge.inspection.report import write_report
    from evomerge.run import start_run
    from evomerge.store import RunStore

    run = tmp_path / "run"
    summary = start_run(dataflow_experiment(tmp_path, models), run_dir=run, progress=False)
    with RunStore.open_reader(run) as store:
        candidates = {c.ticket: c for c in store.candidates()}
        results = store.results()
    assert {c.recipe["kind"] for c in candidates.values()} == {"path"}
    failed = [r for r in results if not r.ok]
    assert failed and all(r.error.startswith("ConfigError: path:") for r in failed)
    assert any("exceed max_layers 5" in r.error for r in failed)
    for r in failed:
        hops = len(candidates[r.ticket].recipe["hops"])
        assert hops > 5 or hops == 0
    assert all(len(candidates[r.ticket].recipe["hops"]) <= 5 for r in results if r.ok)
    labels = [row["label"] for row in summary["rows"]]
    assert labels[0].startswith("best merge") and {"a", "b", "uniform average"} <= set(labels)
    best = summary["best"]["candidate"]
    assert pareto_front(run)[0].summary.startswith("path, ")
    page = write_report(run)
    assert (page.parent / "recipe.png").is_file() and "a path of" in page.read_text()
    folder, ticket, no_mergekit = export_candidate(run, tmp_path / "best", best=True, progress=False)
    assert ticket == best
    exported = AutoModelForCausalLM.from_pretrained(folder)
    namespace: dict = {}
    exec(FITNESS, namespace)
    recorded = summary["rows"][0]["objectives"]["fit"]
    assert namespace["fit"](exported, None)["fit"] == pytest.approx(recorded, abs=1e-6)  # float rounding of w / C_j
    best_path = recipe_from_dict(candidates[best].recipe)
    assert exported.config.num_hidden_layers == len(best_path.hops)
    assert (no_mergekit is None) == (not best_path.scaled)


def test_unscaled_paths_repeat_and_hit_the_fitness_cache(models, tmp_path):
    from evomerge.run import start_run
    from evomerge.store import RunStore

    run = tmp_path / "run"
    start_run(dataflow_experiment(tmp_path, models, scaling="none", repeats=1), run_dir=run, progress=False)
    with RunStore.open_reader(run) as store:
        results = store.results()
        recipes = {c.ticket: c.recipe_hash for c in store.candidates()}
    cached = [r for r in results if r.cached_from is not None]
    assert cached and all(recipes[r.ticket] == recipes[r.cached_from] for r in cached)
