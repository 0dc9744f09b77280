"""lm-eval's HFLM around a model that stays resident, and a timer for its forward passes.

``ResidentLM`` holds a *reference* to the model, so weights written in place between evaluations
are what the next evaluation sees; it keeps no response cache (lm-eval's ``CachingLM`` is never
used). It suppresses progress bars and memoizes tokenization: prompts are the same for every
candidate and tokenizing them is pure, so only the first evaluation pays for it.

Greedy ``generate_until`` batches skip Hugging Face's ``generate``: its per-step Python (input
preparation, generation-config handling, stopping criteria that re-decode every row) cost a quarter
of the forward time on a zoo model. ``greedy_generate`` makes the same forward calls with the same
inputs and applies the same stopping rules, so it returns the very tensor ``generate`` would; any
option it does not reproduce (sampling, logits processors from the model's generation config, a
custom cache or input preparation, remote code) goes to ``generate`` as before.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from transformers import DynamicCache, GenerationConfig, GenerationMixin

from evomerge.fitness.runtime import silenced

_TOKEN_CACHE_SIZE = 1 << 16
# lm-eval's greedy request after HFLM's normalization; anything else is passed to ``generate``.
_GREEDY_KWARGS = frozenset({"attention_mask", "do_sample", "temperature"})
# Generation-config fields that leave greedy decoding alone whatever their value: token ids (read
# below), bookkeeping, ``max_length`` (lm-eval passes its own) and sampling settings (the request's
# ``do_sample=False`` overrides them). Any other field must hold Hugging Face's default.
_INERT_CONFIG_KEYS = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "transformers_version",
        "_from_model_config",
        "max_length",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "top_h",
        "epsilon_cutoff",
        "eta_cutoff",
    }
)
_NEUTRAL_CONFIG_VALUES = {
    **GenerationConfig._get_default_generation_params(),
    "output_attentions": False,
    "output_hidden_states": False,
}
# Hugging Face's generation steps that the lean loop reproduces; a model overriding one keeps ``generate``.
_GENERATION_HOOKS = ("generate", "prepare_inputs_for_generation", "_update_model_kwargs_for_generation", "_sample")


class ResidentLM(HFLM):
    """HFLM for an in-memory ``PreTrainedModel``; sets the tokenizer's pad token if it has none.

    ``lean_greedy=False`` keeps every generation on Hugging Face's ``generate`` (the reference the
    lean loop is tested against).
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, *, lean_greedy: bool = True) -> None:
        # HFLM warns that an in-memory model skips its loading options: that is the point here.
        with silenced("lm_eval.models.huggingface"):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self._encode = lru_cache(maxsize=_TOKEN_CACHE_SIZE)(self._encode_uncached)
        self._batch_encode = lru_cache(maxsize=_TOKEN_CACHE_SIZE)(self._batch_encode_uncached)
        self._decode_window = lru_cache(maxsize=_TOKEN_CACHE_SIZE)(self._decode_window_uncached)
        self._lean_greedy = lean_greedy and _lean_loop_reproduces(self.model) and self.backend == "causal"
        self.generate_seconds = 0.0

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        if kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        return list(self._encode(string, add_special_tokens, left_truncate_len))

    def _encode_uncached(self, string: str, add_special_tokens: bool | None, left_truncate_len: int | None) -> tuple:
        return tuple(super().tok_encode(string, add_special_tokens, left_truncate_len))

    def tok_batch_encode(
        self,
        strings: list[str],
        padding_side: str = "left",
        left_truncate_len: int | None = None,
        truncation: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self._batch_encode(tuple(strings), padding_side, left_truncate_len, truncation)
        return ids.clone(), mask.clone()

    def _batch_encode_uncached(
        self, strings: tuple[str, ...], padding_side: str, left_truncate_len: int | None, truncation: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().tok_batch_encode(list(strings), padding_side, left_truncate_len, truncation)

    def loglikelihood(self, requests: list, disable_tqdm: bool = True) -> list:
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = True) -> list:
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests: list, disable_tqdm: bool = True) -> list:
        return super().generate_until(requests, disable_tqdm=True)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        """Greedy batches through ``greedy_generate``, the rest through Hugging Face's ``generate``.

        Adds the time spent (forward passes plus the decoding loop) to ``generate_seconds``, so the
        evaluator can tell that loop from lm-eval's own work.
        """
        start = time.perf_counter()
        try:
            mask = kwargs.get("attention_mask")
            if not self._greedy_request(context, max_length, kwargs):
                return super()._model_generate(context, max_length, stop, **kwargs)
            with torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ):
                return greedy_generate(
                    self.model,
                    context,
                    mask,
                    max_length,
                    StopStrings(stop, self.tokenizer, self._decode_window, context.shape[0]),
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_ids=_token_ids(self.model.generation_config.eos_token_id),
                )
        finally:
            self.generate_seconds += time.perf_counter() - start

    def _greedy_request(self, context: torch.Tensor, max_length: int, kwargs: dict[str, Any]) -> bool:
        """Whether ``generate`` would decode this request greedily with nothing the lean loop lacks."""
        if not self._lean_greedy or not set(kwargs) <= _GREEDY_KWARGS or self.tokenizer.pad_token_id is None:
            return False
        if kwargs.get("do_sample") not in (None, False) or kwargs.get("temperature", 0.0) != 0.0:
            return False
        mask = kwargs.get("attention_mask")
        if mask is None or mask.shape != context.shape or max_length <= context.shape[1]:
            return False
        return _greedy_config(self.model)

    def _decode_window_uncached(self, ids: tuple[int, ...]) -> str:
        return self.tokenizer.decode(list(ids))


class StopStrings:
    """lm-eval's stop-string criteria (``MultiTokenEOSCriteria``, one per string), decoded once per window.

    As there: each row is checked on the decoded last ``len(tokens(string)) + 2`` generated tokens,
    a row that showed the string stays marked, and a string stops the batch only once every row
    has shown it. ``decode`` maps a window of token ids to its text (memoized by the caller).
    """

    def __init__(self, stops: Sequence[str], tokenizer: Any, decode: Callable[[tuple[int, ...]], str], batch: int):
        self._checks = [(s, len(tokenizer.encode(s, add_special_tokens=False)) + 2, [False] * batch) for s in stops]
        self._decode = decode

    def update(self, rows: Sequence[list[int]]) -> bool:
        """Marks the rows whose newest window shows a stop string; True if one string is in every row."""
        fired = False
        for stop, lookback, shown in self._checks:
            for i, row in enumerate(rows):
                if not shown[i]:
                    shown[i] = stop in self._decode(tuple(row[-lookback:]))
            fired = fired or all(shown)
        return fired


@torch.no_grad()
def greedy_generate(
    model: Any,
    context: torch.Tensor,
    attention_mask: torch.Tensor,
    max_length: int,
    stops: StopStrings,
    *,
    pad_token_id: int,
    eos_token_ids: frozenset[int],
) -> torch.Tensor:
    """Hugging Face's greedy ``generate`` for a left-padded batch, without its per-step machinery.

    Same forward calls as ``generate`` (prefill with position ids from the mask's cumulative sum,
    then one token per step on a ``DynamicCache``; the mask is dropped when it is all ones), same
    argmax on float32 logits, same stopping: ``max_length``, every row past an EOS token (rows
    past it are filled with ``pad_token_id``), or a stop string shown by every row. Returns the
    context followed by the new tokens, as ``generate`` does.
    """
    batch, prompt_length = context.shape
    signature = inspect.signature(model.forward).parameters
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    mask = None if bool((attention_mask == 1).all()) else attention_mask
    inputs: dict[str, Any] = {
        "input_ids": context.clone(memory_format=torch.contiguous_format),
        cache_keyword(signature): DynamicCache(config=model.config.get_text_config(decoder=True)),
        "use_cache": True,
        "return_dict": True,
    }
    if "logits_to_keep" in signature:
        inputs["logits_to_keep"] = 1
    rows: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    for length in range(prompt_length + 1, max_length + 1):
        if "position_ids" in signature:
            inputs["position_ids"] = position_ids
        if mask is not None:
            inputs["attention_mask"] = mask
        outputs = model(**inputs)
        top = outputs.logits[:, -1].to(dtype=torch.float32).argmax(dim=-1).tolist()
        del outputs
        for i, token in enumerate(top):
            if eos_token_ids and finished[i]:
                token = pad_token_id
            rows[i].append(token)
            finished[i] = finished[i] or token in eos_token_ids
        if stops.update(rows) or all(finished) or length == max_length:
            break
        tokens = torch.tensor([row[-1] for row in rows], dtype=context.dtype, device=context.device)
        inputs["input_ids"] = tokens[:, None]
        position_ids = position_ids[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
    generated = torch.tensor(rows, dtype=context.dtype, device=context.device)
    return torch.cat([context, generated], dim=-1)


def cache_keyword(forward_parameters: Mapping[str, Any]) -> str:
    """The name ``forward`` takes the KV cache under: ``cache`` since transformers 5.x (where
    ``past_key_values`` still works but warns on every call), ``past_key_values`` before."""
    return "cache" if "cache" in forward_parameters else "past_key_values"


def _lean_loop_reproduces(model: Any) -> bool:
    """A decoder-only transformers model on the stock generation steps and the default dynamic cache."""
    cls = type(model)
    return (
        isinstance(model, GenerationMixin)
        and cls.__module__.startswith("transformers.")
        and not model.config.is_encoder_decoder
        and all(getattr(cls, name) is getattr(GenerationMixin, name) for name in _GENERATION_HOOKS)
        and model._supports_default_dynamic_cache()
    )


def _greedy_config(model: Any) -> bool:
    """Whether the model's generation settings add nothing to plain greedy decoding.

    A model config carrying generation parameters makes ``generate`` raise: it keeps that path too.
    """
    if model.config._get_generation_parameters():
        return False
    return all(
        key in _INERT_CONFIG_KEYS or (key in _NEUTRAL_CONFIG_VALUES and value == _NEUTRAL_CONFIG_VALUES[key])
        for key, value in model.generation_config.to_diff_dict().items()
    )


def _token_ids(value: int | list[int] | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)


class ForwardTimer:
    """Seconds spent inside ``model.forward`` while active (hooks, removed on exit).

    On CUDA the hooks synchronize so the time is the kernels' and not just their launch.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._sync: Callable[[], None] = torch.cuda.synchronize if _on_cuda(model) else (lambda: None)
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardTimer:
        self._handles = [
            self._model.register_forward_pre_hook(self._before),
            self._model.register_forward_hook(self._after, always_call=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._sync()
            self._start = time.perf_counter()
        self._depth += 1

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._sync()
            self.seconds += time.perf_counter() - self._start


def _on_cuda(model: torch.nn.Module) -> bool:
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "cuda"
