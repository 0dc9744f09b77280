"""lm-eval's HFLM around a model that stays resident, and a timer for its forward passes.

``ResidentLM`` holds a *reference* to the model, so weights written in place between evaluations
are what the next evaluation sees; it keeps no response cache (lm-eval's ``CachingLM`` is never
used). It suppresses progress bars and memoizes tokenization: prompts are the same for every
candidate and tokenizing them is pure, so only the first evaluation pays for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from evomerge.fitness.runtime import silenced

_TOKEN_CACHE_SIZE = 1 << 16


class ResidentLM(HFLM):
    """HFLM for an in-memory ``PreTrainedModel``; sets the tokenizer's pad token if it has none."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int) -> None:
        # HFLM warns that an in-memory model skips its loading options: that is the point here.
        with silenced("lm_eval.models.huggingface"):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self._encode = lru_cache(maxsize=_TOKEN_CACHE_SIZE)(self._encode_uncached)
        self._batch_encode = lru_cache(maxsize=_TOKEN_CACHE_SIZE)(self._batch_encode_uncached)
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
        """Adds the time spent in Hugging Face's generate (forward passes plus its decoding loop)
        to ``generate_seconds``, so the evaluator can tell that loop from lm-eval's own work."""
        start = time.perf_counter()
        try:
            return super()._model_generate(context, max_length, stop, **kwargs)
        finally:
            self.generate_seconds += time.perf_counter() - start


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
