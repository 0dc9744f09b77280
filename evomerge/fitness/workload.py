"""What an evaluation asks of memory: its largest batch, as the plan's arithmetic needs it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Workload(BaseModel):
    """The largest forward batch of one part of an evaluation (an lm-eval task, a Python fitness).

    ``prompt_tokens`` is the longest input of a batch (prompt, or context and continuation when
    scoring), ``new_tokens`` how many tokens are generated after it (0: scoring only), and
    ``all_logits`` whether the logits of every position are kept (log-likelihood scoring) rather
    than the last position's only (greedy generation).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(ge=1, description="sequences per forward pass")
    prompt_tokens: int = Field(ge=1, description="longest input, in tokens")
    new_tokens: int = Field(default=0, ge=0, description="tokens generated after the input")
    all_logits: bool = Field(default=False, description="logits of every position kept (scoring), not only the last")
    name: str = Field(default="", description="what this workload is (a task name)")


DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's HFLM default when a task does not set ``max_gen_toks``."""


def lm_eval_workloads(spec: Any, tokenizer: Any) -> list[Workload]:
    """Per task, its largest batch: ``batch_size`` requests of its longest prompt (and generation).

    The tasks are built as a worker builds them (same subset, few-shot seed and chat template), in
    a fresh instance so that the worker's own tasks are untouched. Without a tokenizer a prompt's
    tokens are bounded by its UTF-8 bytes (byte-level and byte-fallback tokenizers never exceed it).
    """
    from evomerge.fitness.lm_eval_fitness import LmEvalFitness

    fitness = LmEvalFitness(spec)
    template = None
    if spec.apply_chat_template and tokenizer is not None:
        def template(history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return tokenizer.apply_chat_template(
                history, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )

    def tokens(text: str) -> tuple[int, ...] | int:
        """Token ids of ``text`` (its byte count when there is no tokenizer)."""
        if tokenizer is None:
            return len(text.encode("utf-8"))
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    def count(encoded: tuple[int, ...] | int) -> int:
        return encoded if isinstance(encoded, int) else len(encoded)

    out = []
    for prepared in {id(t.task): t for t in fitness.tasks}.values():
        task = prepared.task
        task.build_all_requests(apply_chat_template=spec.apply_chat_template, chat_template=template)
        longest, new_tokens, scoring = 1, 0, False
        rows: set[object] = set()
        for index, instance in enumerate(task.instances):
            args = instance.arguments
            if instance.request_type == "generate_until":
                longest = max(longest, count(tokens(args[0])) + 1)
                new_tokens = max(new_tokens, int((args[1] or {}).get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)))
                rows.add(index)
                continue
            scoring = True
            context, continuation = (args[0], args[1]) if len(args) > 1 else ("", args[0])
            cont = tokens(continuation)
            longest = max(longest, count(tokens(context)) + count(cont) + 1)
            # lm-eval runs requests that differ only in a one-token continuation as one row
            rows.add((context, cont[:-1]) if isinstance(cont, tuple) else index)
        out.append(Workload(batch_size=min(spec.batch_size, max(len(rows), 1)), prompt_tokens=longest,
                            new_tokens=new_tokens, all_logits=scoring, name=prepared.name))
    return out
