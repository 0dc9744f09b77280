"""The tiny zoo: data generators, tokenizer, scorer semantics, spec validation, a reduced build."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError
from evomerge.zoo import build as build_mod
from evomerge.zoo.build import build_zoo
from evomerge.zoo.corpus import base_sequence, task_sequence
from evomerge.zoo.experts import ExpertTrainingError
from evomerge.zoo.fitness_files import write_fitness
from evomerge.zoo.index import ZooIndex
from evomerge.zoo.languages import (
    ANS,
    DIGITS_A,
    DIGITS_B,
    EOS,
    to_a,
    to_lang,
    vocabulary,
)
from evomerge.zoo.model import aligned_embeddings
from evomerge.zoo.portable import PORTABLE_ENV
from evomerge.zoo.quick_eval import exact_match
from evomerge.zoo.spec import load_spec, parse_spec, spec_hash
from evomerge.zoo.tasks import answer_text, prompt_text, split_of, task
from evomerge.zoo.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
MIX = {"translation": 0.35, "monolingual": 0.25, "codeswitch": 0.15, "qa_a": 0.25}


def tiny_spec(**over: object) -> dict:
    run = {"lr": 0.003, "batch_size": 8, "warmup": 1}
    spec = {
        "seed": 0,
        "threads": 1,
        "kernels": "native",
        "model": {"layers": 1, "hidden": 16, "heads": 2, "ffn": 32},
        "base": {**run, "steps": 3, "mixture": MIX},
        "experts": [
            {**run, "name": "skill", "tasks": ["add_a"], "steps": 2},
            {**run, "name": "lang", "tasks": ["qa_b"], "steps": 2},
        ],
        "eval": {"tasks": ["add_a", "add_b"], "n_validation": 4, "n_test": 6},
        "settings": [{"name": "cross", "experts": ["skill", "lang"], "tasks": ["add_b"], "target": "add_b"}],
    }
    spec.update(over)
    return spec


# --- data generators -----------------------------------------------------------------------


def test_eval_sets_are_deterministic_distinct_and_in_their_split() -> None:
    t = task("add_b")
    val = t.eval_set("validation", 200, 99, 0)
    assert val == t.eval_set("validation", 200, 99, 0)
    assert len({ex.item for ex in val}) == 200
    assert all(split_of("add", ex.item) == "validation" for ex in val)
    assert t.eval_set("validation", 200, 99, 1) != val


def test_train_val_test_items_are_disjoint_and_shared_across_languages() -> None:
    add_a, add_b = task("add_a"), task("add_b")
    test_items = {ex.item for ex in add_b.eval_set("test", 500, 99, 0)}
    val_items = {ex.item for ex in add_b.eval_set("validation", 300, 99, 0)}
    assert not test_items & val_items
    # the A-language skill data never contains a target test item, even though A != B
    assert test_items == {ex.item for ex in add_a.eval_set("test", 500, 99, 0)}
    rng = random.Random(0)
    train_items = {add_a.draw(rng, 99, "train").item for _ in range(3000)}
    assert not train_items & (test_items | val_items)
    shares = [split_of("add", (a, b)) for a in range(100) for b in range(100)]
    assert 0.06 < shares.count("test") / 10_000 < 0.10
    assert 0.03 < shares.count("validation") / 10_000 < 0.07


def test_target_is_language_gated() -> None:
    ex = task("add_b").render((59, 1))
    assert ex.prompt == to_lang(["what", "is", "5", "9", "plus", "1", "?"], "B")
    assert ex.answer == [DIGITS_B[6], DIGITS_B[0]]
    assert to_a(ex.answer) == ["6", "0"]
    assert answer_text(ex) == "η α" and answer_text(task("add_a").render((59, 1))) == "6 0"
    assert prompt_text(ex) == "ka wa ζ κ tasu β ¿ ="


def test_generators_are_seeded_and_base_mixture_has_no_answered_b_or_addition() -> None:
    draw = lambda seed: [base_sequence(random.Random(seed), 99, MIX, 0.35).tokens for _ in range(1)]
    assert draw(3) == draw(3)
    rng = random.Random(0)
    b_digits = set(DIGITS_B)
    for _ in range(2000):
        seq = base_sequence(rng, 99, MIX, 0.35)
        if ANS in seq.tokens:  # answered questions in the base are A-only after/before/bigger
            assert "plus" not in seq.tokens and not b_digits & set(seq.tokens)
        assert all(seq.loss)
    ex = task_sequence(random.Random(1), "add_a", 99)
    k = ex.tokens.index(ANS)
    assert ex.loss == [False] * (k + 1) + [True] * (len(ex.tokens) - k - 1)


def test_easy_skills_in_the_base_are_one_digit_additions_and_three_digit_sorts_of_training_items() -> None:
    mix = {**MIX, "add1_a": 0.2, "sort3_a": 0.2}
    rng = random.Random(0)
    answered: dict[str, int] = {}
    for _ in range(3000):
        seq = base_sequence(rng, 99, mix, 0.35)
        if ANS not in seq.tokens:
            continue
        k = seq.tokens.index(ANS)
        prompt, answer = seq.tokens[:k], seq.tokens[k + 1:]
        assert not set(DIGITS_B) & set(seq.tokens) and all(seq.loss)  # never answered in B
        kind = prompt[0] if prompt[0] == "sort" else "plus" if "plus" in prompt else "qa"
        answered[kind] = answered.get(kind, 0) + 1
        if kind == "plus":
            a, b = prompt[2:prompt.index("plus")], prompt[prompt.index("plus") + 1:-1]
            assert len(a) == len(b) == 1 and answer == list(str(int(a[0]) + int(b[0])))
        if kind == "sort":
            assert len(prompt) == 5 and answer == sorted(prompt[1:4])
    assert min(answered.values()) > 300 and set(answered) == {"plus", "sort", "qa"}
    # the easy families share their parent's splits: no held-out add/sort question is an easy training one
    rng = random.Random(1)
    for name, parent in (("add1_a", "add"), ("sort3_a", "sort")):
        items = {task(name).draw(rng, 99, "train").item for _ in range(500)}
        assert all(split_of(parent, item) == "train" for item in items)
        held_out = {ex.item for split in ("validation", "test") for ex in task(f"{parent}_a").eval_set(split, 300, 99, 0)}
        assert not items & held_out
    assert all(split_of("add", ex.item) == "test" for ex in task("add1_a").eval_set("test", 5, 99, 0))


def test_aligned_embeddings_shift_every_b_token_by_one_offset() -> None:
    emb = aligned_embeddings(len(vocabulary()), 16, std=0.1, offset_norm=0.5, generator=torch.Generator().manual_seed(0))
    v = vocabulary()
    offsets = torch.stack([emb[v.index(b)] - emb[v.index(a)] for a, b in zip(DIGITS_A + ("plus",), DIGITS_B + ("tasu",))])
    assert torch.allclose(offsets, offsets[0].expand_as(offsets), atol=1e-6)
    assert offsets[0].norm().item() == pytest.approx(0.5, rel=1e-5)


# --- tokenizer and scorer ------------------------------------------------------------------


def test_tokenizer_round_trip_after_save_and_reload(tmp_path: Path) -> None:
    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "ka wa ε κ tasu β ¿ ="
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 9
    assert tok.decode(ids, skip_special_tokens=True) == text
    answer = [tok.convert_tokens_to_ids(t) for t in ("η", "α")] + [tok.eos_token_id]
    assert tok.decode(answer, skip_special_tokens=True) == "η α"
    assert (tok.eos_token, tok.pad_token) == (EOS, "<pad>")


class _Oracle(torch.nn.Module):
    """Answers each addition prompt with the right sum in a chosen script, then EOS."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script
        self.vocab = vocabulary()

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True):
        if past_key_values is None:
            plans = []
            for row in input_ids.tolist():
                words = to_a([self.vocab[i] for i in row[1:-1]])
                k = words.index("plus")
                a, b = int("".join(words[2:k])), int("".join(words[k + 1 : -1]))
                digits = to_lang(list(str(a + b)), self.script)
                plans.append([self.vocab.index(t) for t in digits] + [self.vocab.index(EOS)])
            state = {"plans": plans, "step": 0}
        else:
            state = past_key_values
            state["step"] += 1
        logits = torch.zeros(input_ids.shape[0], 1, len(self.vocab))
        for r, plan in enumerate(state["plans"]):
            logits[r, 0, plan[min(state["step"], len(plan) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=state)


def test_scorer_counts_only_answers_in_the_asked_language() -> None:
    exs = task("add_b").eval_set("test", 40, 99, 0)
    assert all(exact_match(_Oracle("B"), task("add_b"), exs))
    assert not any(exact_match(_Oracle("A"), task("add_b"), exs))
    assert all(exact_match(_Oracle("A"), task("add_a"), task("add_a").eval_set("test", 40, 99, 0)))


# --- spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "zoo spec: colour: unknown key"),
        ({"model": {"layers": 2, "widht": 3}}, "zoo spec: model.widht: unknown key"),
        ({"model": {"hidden": 30, "heads": 4}}, "zoo spec: model: hidden (30) must be a multiple of heads (4)"),
        ({"eval": {"tasks": ["add_c"]}}, "zoo spec: eval.tasks: unknown task 'add_c'"),
        ({"base": {"steps": 0, "lr": 0.1, "mixture": MIX}}, "zoo spec: base.steps: Input should be greater than or equal to 1"),
        ({"base": {"steps": 5, "lr": 0.1, "mixture": {"poetry": 1.0}}}, "zoo spec: base.mixture: unknown source 'poetry'"),
    ],
)
def test_spec_errors_are_one_line_and_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_spec(tiny_spec(**change))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_spec_cross_references_are_checked() -> None:
    experts = tiny_spec()["experts"]
    with pytest.raises(ConfigError, match=r"^zoo spec: expert names must be unique, repeated: skill$"):
        parse_spec(tiny_spec(experts=[experts[0], experts[0]]))
    bad = [{"name": "cross", "experts": ["skill", "ghost"], "tasks": ["add_b"]}]
    with pytest.raises(ConfigError, match=r"unknown expert 'ghost'"):
        parse_spec(tiny_spec(settings=bad))


def test_shipped_specs_are_valid_and_hash_differs_per_spec() -> None:
    default = load_spec(REPO / "evomerge/zoo/default.yaml")
    ci = load_spec(REPO / "evomerge/zoo/ci.yaml")
    assert spec_hash(default) != spec_hash(ci)
    assert spec_hash(default) == spec_hash(load_spec(REPO / "evomerge/zoo/default.yaml"))
    assert {s.name for s in default.settings} == {"cross_lingual", "multi_skill"}


def test_repo_fitness_folder_matches_the_default_spec(tmp_path: Path) -> None:
    spec = load_spec(REPO / "evomerge/zoo/default.yaml")
    write_fitness(tmp_path, spec.eval, spec.max_operand)
    repo = REPO / "fitness"
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert produced == sorted(p.relative_to(repo) for p in repo.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for rel in produced:
        assert (repo / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


# --- reduced end-to-end build ----------------------------------------------------------------


def test_tiny_build_loads_indexes_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "zoo"
    index = build_zoo(tiny_spec(), out)
    assert [(m.name, m.role, m.parent) for m in index.models] == [
        ("base", "base", None), ("skill", "expert", "base"), ("lang", "expert", "base")
    ]
    assert ZooIndex.load(out / "zoo.json") == index
    assert index.settings[0].target == "add_b"
    assert index.lm_eval_tasks == ["zoo_add_a", "zoo_add_a_mc", "zoo_add_b", "zoo_add_b_mc"]
    base_emb = None
    for m in index.models:
        assert set(m.scores) == {"add_a", "add_b"}
        assert all(set(s) == {"validation", "test"} and 0 <= s["test"] <= 100 for s in m.scores.values())
        folder = out / m.folder
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.num_hidden_layers == 1
        assert AutoTokenizer.from_pretrained(folder).decode([5, 6]) == "0 1"
        assert "add_b" in (folder / "README.md").read_text()
        emb = model.get_input_embeddings().weight
        base_emb = emb if base_emb is None else base_emb
        assert torch.equal(emb, base_emb)  # frozen, shared embeddings: task vectors live in the layers
    assert (out / "fitness/data/add_b.test.jsonl").read_text().count("\n") == 6

    weights = load_file(out / "skill/model.safetensors")
    monkeypatch.setattr(build_mod, "_build", lambda *a, **k: pytest.fail("cache miss: retrained"))
    assert build_zoo(tiny_spec(), out) == index
    monkeypatch.undo()

    rebuilt = build_zoo(tiny_spec(), out, force=True)
    again = load_file(out / "skill/model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # deterministic training
    assert [m.scores for m in rebuilt.models] == [m.scores for m in index.models]


def test_build_writes_only_into_an_empty_folder_or_a_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder holding anything but a zoo is refused before any training (its ``fitness/`` and a
    folder named like a zoo model included); in a zoo, a rebuild keeps the user's own files; an
    interrupted build is still recognised as a zoo (its marker) and finished by the next build."""
    mine = tmp_path / "mine"
    for name in ("thesis.tex", "fitness/my_task.yaml", "base/notes.txt"):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(name)
    real_build = build_mod._build
    monkeypatch.setattr(build_mod, "_build", lambda *a, **k: pytest.fail("built into a folder that is not a zoo"))
    with pytest.raises(ConfigError) as info:
        build_zoo(tiny_spec(), mine, force=True)
    assert str(info.value).startswith(f"{mine}: not a zoo folder (no zoo.json) and not empty;")
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == [
        "base", "base/notes.txt", "fitness", "fitness/my_task.yaml", "thesis.tex"
    ]
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match=f"{file}: zoo folder exists and is not a folder"):
        build_zoo(tiny_spec(), file)

    from evomerge.zoo.folder import BUILD_MARKER

    monkeypatch.setattr(build_mod, "_build", real_build)
    out = tmp_path / "zoo"
    out.mkdir()
    index = build_zoo(tiny_spec(), out)
    assert not (out / BUILD_MARKER).exists()
    (out / "my_notes.txt").write_text("mine")
    (out / "zoo.json").unlink()  # as if a rebuild was killed after its marker: still a zoo
    (out / BUILD_MARKER).write_text("interrupted\n")
    rebuilt = build_zoo(tiny_spec(), out)
    assert [m.scores for m in rebuilt.models] == [m.scores for m in index.models]
    assert ZooIndex.load(out / "zoo.json") == rebuilt and not (out / BUILD_MARKER).exists()
    assert (out / "my_notes.txt").read_text() == "mine"


def _native_build_under(env: dict[str, str], out: Path) -> dict[str, torch.Tensor]:
    """Build the tiny zoo on this process's own kernels, in a fresh process with ``env`` (read at torch's start)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_zoo import tiny_spec; "
        "from evomerge.zoo.build import build_zoo; build_zoo(tiny_spec(kernels='native'), sys.argv[2])"
    )
    full = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")} | env
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), str(out)], env=full,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(out / "skill/model.safetensors")


def test_portable_build_uses_pinned_kernels_whatever_the_callers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    top = torch.backends.cpu.get_cpu_capability().lower()
    assert top in ("avx2", "avx512"), "needs an x86-64 CPU with AVX2 to compare kernel tiers"
    pinned = _native_build_under(PORTABLE_ENV, tmp_path / "native-pinned")
    fastest = _native_build_under({"ATEN_CPU_CAPABILITY": top}, tmp_path / "native-fastest")
    # teeth: the same spec trained on the machine's fastest kernels gives other weights
    assert any(not torch.equal(pinned[k], fastest[k]) for k in pinned)
    monkeypatch.delenv("MKL_CBWR", raising=False)
    for caller in sorted({"avx2", top}):  # a portable build started on two kernel tiers: the pinned weights
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", caller)
        build_zoo(tiny_spec(kernels="portable"), tmp_path / f"portable-{caller}")
        portable = load_file(tmp_path / f"portable-{caller}/skill/model.safetensors")
        assert all(torch.equal(pinned[k], portable[k]) for k in pinned), caller


def test_experts_trained_side_by_side_equal_one_process_and_workers_leave_the_hash(tmp_path: Path) -> None:
    one = build_zoo(tiny_spec(workers=1), tmp_path / "one")
    two = build_zoo(tiny_spec(workers=2, kernels="portable"), tmp_path / "two-portable")
    assert spec_hash(parse_spec(tiny_spec(workers=1))) == spec_hash(parse_spec(tiny_spec(workers=2)))
    both = build_zoo(tiny_spec(workers=2), tmp_path / "two")
    assert [m.scores for m in both.models] == [m.scores for m in one.models]
    for name in ("base", "skill", "lang"):
        a = load_file(tmp_path / "one" / name / "model.safetensors")
        b = load_file(tmp_path / "two" / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    trained = {m.name: m for m in both.models if m.role == "expert"}
    assert {n: m.train_steps for n, m in trained.items()} == {"skill": 2, "lang": 2}
    assert all(m.final_loss > 0 for m in trained.values())
    # teeth: the experts differ from the base and from each other, and the portable side-by-side build ran
    skill = load_file(tmp_path / "two" / "skill" / "model.safetensors")
    lang = load_file(tmp_path / "two" / "lang" / "model.safetensors")
    assert any(not torch.equal(skill[k], lang[k]) for k in skill)
    assert (tmp_path / "two-portable" / "zoo.json").is_file() and len(two.models) == 3


def test_a_failing_expert_worker_is_one_error_naming_the_expert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = tmp_path / "python-that-fails"
    worker.write_text("#!/bin/sh\nexit 3\n")
    worker.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(worker))  # what the build starts its expert workers with
    with pytest.raises(ExpertTrainingError, match=r"^zoo build: the process training expert '(skill|lang)' failed \(exit code 3\)"):
        build_zoo(tiny_spec(workers=2), tmp_path / "zoo")
    assert not (tmp_path / "zoo" / "zoo.json").exists()


def test_a_worker_printing_other_lines_still_reports_its_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    worker = tmp_path / "chatty-python"
    worker.write_text(f"#!/bin/sh\necho 'a library says hello'\necho '[1, 2]'\nexec {sys.executable} \"$@\"\n")
    worker.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(worker))
    index = build_zoo(tiny_spec(workers=2), tmp_path / "zoo")
    assert [m.train_steps for m in index.models if m.role == "expert"] == [2, 2]
    assert capsys.readouterr().err.count("a library says hello") == 2
