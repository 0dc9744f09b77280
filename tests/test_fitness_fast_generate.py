"""ResidentLM's lean greedy loop returns exactly what Hugging Face's ``generate`` returns.

Every case runs the same requests through a lean ``ResidentLM`` and a stock one
(``lean_greedy=False``, i.e. HFLM's ``_model_generate`` -> ``model.generate``) on the same model and
compares the generated token tensors (shape included, so the step at which the batch stops) and
lm-eval's strings and scores. A spy on HFLM's ``_model_generate`` proves which path ran. The pico
Llama is random-init; the prompts and stop strings below were picked from its greedy continuations
and each case first asserts the situation it is meant to exercise (a stop string hit by some rows
only, by all rows at different steps, EOS mid-batch, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.fitness import LmEvalFitness
from evomerge.fitness.lm import ForwardTimer, ResidentLM

DATA = Path(__file__).parent / "data" / "fitness"
# Mixed lengths (1 to 6 words), so batches are left-padded.
PROMPTS = ("0", "5 8", "+ . the", "? of in minus", "to plus answer c 2", "equals b 1 4 7 +")
# Rows 0-3 and 5 show "w" (a substring: "w1", "answer") at steps 5, 3, 1, 4 and 4 of their greedy
# continuation; row 4 never does.
W_ROWS = (0, 1, 2, 3, 5)
MAX_NEW = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Pico forward passes are too small to gain from intra-op threads; on a shared machine extra threads
    only wait for busy cores (this file takes ~10 s on one thread, over a minute on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(make_pico) -> Path:
    return make_pico(arch="llama", seed=0)


def _load(folder: Path, *, pad: bool = True, unk: bool = True):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not pad:
        tokenizer.pad_token = None
        model.config.pad_token_id = model.generation_config.pad_token_id = None
    if not unk:
        tokenizer.unk_token = None
    return model, tokenizer


@pytest.fixture
def stock_calls(monkeypatch) -> list[int]:
    """Counts the batches that went through HFLM's own ``_model_generate`` (Hugging Face ``generate``)."""
    calls: list[int] = []
    original = HFLM._model_generate

    def spy(self, context, *args, **kwargs):
        calls.append(context.shape[0])
        return original(self, context, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_generate", spy)
    return calls


def _pair(model, tokenizer, batch_size: int = 8) -> tuple[ResidentLM, ResidentLM]:
    return ResidentLM(model, tokenizer, batch_size), ResidentLM(model, tokenizer, batch_size, lean_greedy=False)


def _generate(lm: ResidentLM, prompts, until: list[str], max_new: int = MAX_NEW) -> torch.Tensor:
    """One batch the way lm-eval's generate_until sends it (left-padded, EOS string appended to the stops)."""
    ids, mask = lm.tok_batch_encode(list(prompts))
    stops = [*until, lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)]
    return lm._model_generate(ids, ids.shape[1] + max_new, stops, attention_mask=mask, do_sample=False)


def _lean_and_stock(model, tokenizer, prompts, until, stock_calls, max_new: int = MAX_NEW):
    lean, stock = _pair(model, tokenizer)
    fast = _generate(lean, prompts, until, max_new)
    assert stock_calls == []  # the lean loop ran, not generate
    reference = _generate(stock, prompts, until, max_new)
    assert stock_calls == [len(prompts)]
    assert torch.equal(fast, reference)
    return reference, _width(lean, prompts)


def _width(lm: ResidentLM, prompts) -> int:
    return lm.tok_batch_encode(list(prompts))[0].shape[1]


def _continuations(tokenizer, out: torch.Tensor, width: int) -> list[str]:
    return [tokenizer.decode(row) for row in out[:, width:].tolist()]


def _force_eos_for(model, tokenizer, word: str) -> None:
    """EOS's output row := the row of ``word``, nudged up: greedy emits EOS wherever it emitted ``word``."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = head[tokenizer.convert_tokens_to_ids(word)] * 1.01


def test_stop_string_hit_by_some_rows_runs_to_max_length(folder, stock_calls):
    model, tokenizer = _load(folder)
    out, width = _lean_and_stock(model, tokenizer, PROMPTS, ["w"], stock_calls)
    assert out.shape == (len(PROMPTS), width + MAX_NEW)  # row 4 never shows "w": no early stop
    texts = _continuations(tokenizer, out, width)
    assert [i for i, text in enumerate(texts) if "w" in text] == list(W_ROWS)


def test_stop_string_in_every_row_stops_the_batch_early(folder, stock_calls):
    model, tokenizer = _load(folder)
    prompts = [PROMPTS[i] for i in W_ROWS]
    out, width = _lean_and_stock(model, tokenizer, prompts, ["w"], stock_calls)
    assert out.shape[1] == width + 5  # the last row to show "w" does so at step 5 of 10
    assert all("w" in text for text in _continuations(tokenizer, out, width))


def test_max_new_tokens_reached_and_single_row(folder, stock_calls):
    model, tokenizer = _load(folder)
    out, width = _lean_and_stock(model, tokenizer, PROMPTS, ["zzz"], stock_calls, max_new=7)
    assert out.shape == (len(PROMPTS), width + 7)
    stock_calls.clear()
    one, one_width = _lean_and_stock(model, tokenizer, PROMPTS[4:5], ["zzz"], stock_calls, max_new=7)
    assert one.shape == (1, one_width + 7)
    assert _continuations(tokenizer, one, one_width)[0] == _continuations(tokenizer, out, width)[4]


@pytest.mark.parametrize(("pad", "unk", "pad_id"), [(True, True, 0), (False, True, 3), (False, False, 2)])
def test_eos_mid_batch_is_padded_like_generate(folder, stock_calls, pad, unk, pad_id):
    """With a pad token, without one (HFLM pads with <unk>), and without either (pads with EOS itself)."""
    model, tokenizer = _load(folder, pad=pad, unk=unk)
    _force_eos_for(model, tokenizer, "m")  # rows 0 and 1 emit "m" at steps 2 and 6
    out, width = _lean_and_stock(model, tokenizer, PROMPTS, ["zzz"], stock_calls)
    assert ResidentLM(model, tokenizer, 1).tokenizer.pad_token_id == pad_id
    new = out[:, width:].tolist()
    assert new[0][1] == tokenizer.eos_token_id and new[0][2:] == [pad_id] * (MAX_NEW - 2)
    assert new[1][5] == tokenizer.eos_token_id and new[1][6:] == [pad_id] * (MAX_NEW - 6)
    assert all(tokenizer.eos_token_id not in row for row in new[2:])
    stock_calls.clear()
    eos_rows = [PROMPTS[0], PROMPTS[1]]  # every row ends with EOS: the batch stops at the last one
    out, width = _lean_and_stock(model, tokenizer, eos_rows, ["zzz"], stock_calls)
    assert out.shape[1] == width + 6


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "qwen3", "mistral"])
def test_other_architectures_match(make_pico, stock_calls, arch):
    model, tokenizer = _load(make_pico(arch=arch, seed=1))
    out, width = _lean_and_stock(model, tokenizer, PROMPTS, ["w", "?"], stock_calls)
    assert out.shape[1] > width


def _requests(prompts, **gen_kwargs) -> list[Instance]:
    return [
        Instance(request_type="generate_until", doc={}, arguments=(p, dict(gen_kwargs)), idx=0) for p in prompts
    ]


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_generate_until_strings_match(folder, stock_calls, batch_size):
    """lm-eval's own batching, sorting, cutting at stop strings; 64 > the 12 requests."""
    model, tokenizer = _load(folder)
    _force_eos_for(model, tokenizer, "m")
    requests = _requests(PROMPTS, until=["w"], max_gen_toks=8, do_sample=False) + _requests(
        PROMPTS, until=["2", "?"], max_gen_toks=5, temperature=0.0
    )
    lean, stock = _pair(model, tokenizer, batch_size)
    fast = lean.generate_until(requests)
    assert stock_calls == []
    reference = stock.generate_until(requests)
    assert len(stock_calls) == {1: 12, 4: 4, 64: 2}[batch_size]  # two groups of 6 requests
    assert fast == reference
    assert len(set(reference)) > 6 and "" in reference  # varied strings, some cut right at the start
    assert reference[:6] == ["r", "s the ", "", "5 3 o ", "to b f 2 to b f 2", "minus 5 l ans"]  # cut at "w"
    assert reference[6:] == ["r", "s the w q r", "w k y w4 -", "5 3 o w h", "to b f ", "minus 5 l answer is"]


def test_sampling_and_unsupported_settings_use_generate(folder, stock_calls):
    model, tokenizer = _load(folder)
    lean = ResidentLM(model, tokenizer, 8)
    torch.manual_seed(0)
    lean.generate_until(_requests(PROMPTS[:2], until=["w"], max_gen_toks=3, do_sample=True, temperature=0.7))
    assert stock_calls == [2]
    lean.generate_until(_requests(PROMPTS[:2], until=["w"], max_gen_toks=3, do_sample=False, top_p=0.5))
    assert stock_calls == [2, 2]  # an option the lean loop does not know
    model.generation_config.repetition_penalty = 1.3
    penalized = lean.generate_until(_requests(PROMPTS, until=["zzz"], max_gen_toks=6, do_sample=False))
    assert stock_calls == [2, 2, 6]
    model.generation_config.repetition_penalty = 1.0  # Hugging Face's default: lean again
    plain = lean.generate_until(_requests(PROMPTS, until=["zzz"], max_gen_toks=6, do_sample=False))
    assert stock_calls == [2, 2, 6] and plain != penalized


def test_phi3_keeps_generate(make_pico, stock_calls):
    """Phi-3 prepares its own generation inputs: the lean loop does not claim to reproduce them."""
    model, tokenizer = _load(make_pico(arch="phi3", seed=0))
    _generate(ResidentLM(model, tokenizer, 8), PROMPTS, ["w"])
    assert stock_calls == [len(PROMPTS)]


def test_generate_seconds_cover_the_forward_passes(folder):
    model, tokenizer = _load(folder)
    lean = ResidentLM(model, tokenizer, 4)
    with ForwardTimer(model) as timer:
        lean.generate_until(_requests(PROMPTS, until=["zzz"], max_gen_toks=6, do_sample=False))
    assert lean.generate_seconds >= timer.seconds > 0


def _task_folder(root: Path, stock: ResidentLM) -> Path:
    """tests/data/fitness plus a multi-token task; answers are the stock strings for even docs, wrong for odd."""
    root.mkdir()
    for name in ("tiny_gen.yaml", "fitness_utils.py"):
        (root / name).write_text((DATA / name).read_text())
    gen_docs = [{"a": i % 10, "b": (3 * i + 1) % 10} for i in range(12)]
    words = [{"q": PROMPTS[i % 6] + " the" * (i // 6)} for i in range(12)]
    gen_answers = stock.generate_until(
        _requests([f"{d['a']} plus {d['b']} is" for d in gen_docs], until=["\n"], max_gen_toks=1, do_sample=False)
    )
    word_answers = stock.generate_until(_requests([d["q"] for d in words], until=["w"], max_gen_toks=6))
    for docs, answers, name in ((gen_docs, gen_answers, "gen_validation"), (words, word_answers, "words")):
        for i, (doc, answer) in enumerate(zip(docs, answers, strict=True)):
            doc["answer"] = answer if i % 2 == 0 else answer + "x"
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "gen_test.jsonl").write_text((root / "gen_validation.jsonl").read_text())
    (root / "words.yaml").write_text(
        "task: words_gen\n"
        "dataset_path: json\n"
        "dataset_kwargs: {data_files: {validation: words.jsonl}}\n"
        "validation_split: validation\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'generation_kwargs: {until: ["w"], max_gen_toks: 6}\n'
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
    )
    return root


def test_fitness_scores_match_stock(folder, tmp_path, stock_calls):
    model, tokenizer = _load(folder)
    tasks = _task_folder(tmp_path / "tasks", ResidentLM(model, tokenizer, 8, lean_greedy=False))
    stock_calls.clear()
    spec = {"include_path": str(tasks), "tasks": [{"task": "tiny_gen"}, {"task": "words_gen"}], "batch_size": 5}
    fast = LmEvalFitness(spec).evaluate(model, tokenizer)
    assert stock_calls == []
    reference = LmEvalFitness(spec, lean_greedy=False).evaluate(model, tokenizer)
    assert stock_calls
    assert fast.per_example == reference.per_example and fast.objectives == reference.objectives
    expected = tuple(float(i % 2 == 0) for i in range(12))
    assert reference.per_example["tiny_gen"].scores == reference.per_example["words_gen"].scores == expected
