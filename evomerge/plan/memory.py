"""The memory plan of one worker: bytes of each part against its device's and host's memory.

A worker holds the source models (where its placement puts them), one merged model, the merge
operators' caches, what a merge call and an evaluation batch hold while they run, and the runtime
itself (Python, torch and the libraries; a CUDA context). ``plan_worker`` adds them up from shapes
alone, for each placement. Caches are optional: they get what is left (or ``cache_memory``),
tensor by tensor in the order the merger visits them, and a tensor without one is merged from
scratch (TIES by streamed selection). Unless the experiment names a placement, the plan keeps the
sources on the device when they fit there, choosing between ``resident`` and ``compact`` the one
that leaves the caches more room (``resident`` on a tie: no conversion per candidate) — an
uncached TIES or DARE tensor costs more than converting its inputs — and streams them from host
memory only when neither fits (each candidate then copies every input over the bus).

The arithmetic mirrors the code that allocates: ``ResidentMerger`` (sources, staging buffers,
caches), the operators' declared ``MemoryCost``, and a decoder's forward pass for evaluation (the
KV cache of every layer, one layer's widest temporaries, the logits). Tests hold it to the peak
resident memory measured on CPU (``tests/test_plan.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.merge.fused import MIN_NUMEL, switched_on
from evomerge.merge.registry import OperatorSpec
from evomerge.plan.capacity import Capacity
from evomerge.plan.shapes import Dimensions, PoolShape
from evomerge.fitness.workload import Workload
from evomerge.runtime.registry import PLACEMENTS
from evomerge.sizes import format_size

RUNTIME_HOST = 512 * 1024**2
"""Python with torch, transformers, lm-eval and evomerge imported, a worker's tokenizer and tasks
loaded (measured on CPU: ``tests/test_plan.py`` checks it)."""
COMPILER_HOST = 96 * 1024**2
"""torch.compile's Inductor and the fused merge kernels it builds (CPU workers merging by sign consensus)."""
CUDA_CONTEXT = 600 * 1024**2
"""A CUDA context and the kernels it loads (cuBLAS and its workspace): an estimate, not measured here."""
CUDA_HOST = 1536 * 1024**2
"""What the CUDA libraries add to a process's host memory once initialized: an estimate."""
RESERVE = 0.05
"""The fraction of a memory the plan leaves free (allocator fragmentation, other processes' growth)."""
CONSENSUS_OPERATORS = frozenset({"ties", "dare_ties", "breadcrumbs_ties", "della"})


@dataclass(frozen=True)
class Part:
    """One consumer of memory: a key (``sources``, ``caches``, ...), where it lives, its bytes."""

    key: str
    label: str
    where: str
    bytes: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"part": self.key, "label": self.label, "where": self.where, "bytes": self.bytes, "detail": self.detail}


@dataclass
class WorkerPlan:
    """The plan of one worker under one placement (see the module docstring)."""

    device: str
    dtype: str
    placement: str
    chosen_by: str
    parts: list[Part]
    capacity: Capacity
    cache_wanted: int
    cache_budget: int
    cached_tensors: int
    tensors: int
    cache_explicit: bool = False
    over: str | None = None
    """The memory ('device' or 'host') the plan overflows, None when it fits."""
    problem: str | None = None
    """Why it does not fit, in one line naming the part and what would fit instead."""
    alternatives: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    def total(self, where: str) -> int:
        """Bytes in ``where`` ('device' or 'host'; on a CPU device both are the host's memory)."""
        if self.on_cpu:
            return sum(p.bytes for p in self.parts) if where == "host" else 0
        return sum(p.bytes for p in self.parts if p.where == where)

    def limit(self, where: str) -> int | None:
        """Usable bytes of ``where`` (the capacity less the reserve), None if unknown."""
        available = self.capacity.host if where == "host" else self.capacity.device
        return None if available is None else int(available * (1 - RESERVE))

    @property
    def fits(self) -> bool:
        return self.over is None

    def part(self, key: str) -> Part:
        return next(p for p in self.parts if p.key == key)

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "placement": self.placement,
            "chosen_by": self.chosen_by,
            "fits": self.fits,
            "problem": self.problem,
            "parts": [p.to_json() for p in self.parts],
            "device_bytes": None if self.on_cpu else self.total("device"),
            "host_bytes": self.total("host"),
            "device_available": self.capacity.device,
            "device_available_from": self.capacity.device_from,
            "host_available": self.capacity.host,
            "host_available_from": self.capacity.host_from,
            "reserve": RESERVE,
            "caches": {"wanted": self.cache_wanted, "budget": self.cache_budget,
                       "cached_tensors": self.cached_tensors, "tensors": self.tensors},
            "placements": self.alternatives,
            "notes": self.notes,
        }


def evaluation_bytes(dims: Dimensions, workload: Workload, itemsize: int, device_type: str) -> int:
    """Peak memory of one evaluation batch on a decoder: KV cache + one layer's temporaries + logits.

    The KV cache holds keys and values of every layer for the input and the generated tokens
    (transformers caches during a plain forward too). The widest layer step of the input's forward
    is the MLP (gate, up and their product) or attention (queries, keys, values, output and, off
    CUDA, the attention scores of every head in float32 — CUDA attention kernels never build them).
    Logits: every position's plus their log-softmax when scoring, the last position's (and a
    float32 copy) when generating.
    """
    b, s = workload.batch_size, workload.prompt_tokens
    total = s + workload.new_tokens
    kv = 2 * dims.layers * b * dims.kv_heads * dims.head_dim * total * itemsize
    stream = 2 * b * s * dims.hidden * itemsize
    mlp = 3 * b * s * dims.intermediate * itemsize
    scores = 0 if device_type == "cuda" else b * dims.heads * s * s * 4
    attention = b * s * (2 * dims.heads + 2 * dims.kv_heads) * dims.head_dim * itemsize + scores
    positions = s if workload.all_logits else 1
    logits = b * positions * dims.vocab * itemsize * 2 + (0 if workload.all_logits else b * dims.vocab * 4)
    return kv + stream + max(mlp, attention) + logits


def _tensor_costs(
    shape: PoolShape, operators: Mapping[str, OperatorSpec] | None, sources: int
) -> list[tuple[int, int, int]]:
    """(numel, cache bytes, work bytes uncached, work bytes cached) per tensor, in merge order."""
    costs = []
    for tensor in shape.tensors:
        op = operators.get(tensor.name) if operators is not None else None
        if op is None:  # a blend (split-point spaces): a weighted sum into the output, nothing held
            costs.append((tensor.numel, 0, 0, 0))
            continue
        memory = op.memory
        costs.append((
            tensor.numel,
            memory.cache_bytes(tensor.numel, sources),
            memory.work_bytes(tensor.numel, sources, cached=False),
            memory.work_bytes(tensor.numel, sources, cached=True),
        ))
    return costs


def admit_caches(costs: Sequence[tuple[int, int, int, int]], budget: int) -> tuple[int, int, int, int]:
    """Caches admitted tensor by tensor in merge order while they fit ``budget`` (never evicted: the
    order is the same every candidate, so least-recently-used eviction would miss every time).

    Returns (bytes wanted, bytes admitted, tensors cached, the largest working memory of a call).
    """
    wanted = admitted = cached = work = 0
    for _, cache, uncached_work, cached_work in costs:
        wanted += cache
        if cache and admitted + cache <= budget:
            admitted += cache
            cached += 1
            work = max(work, cached_work)
        else:
            work = max(work, uncached_work)
    return wanted, admitted, cached, work


def _parts(
    shape: PoolShape,
    *,
    device: str,
    dtype: str,
    placement: str,
    workloads: Sequence[Workload],
    fused: bool,
) -> list[Part]:
    """Every part but the caches and the merge's working memory (which depend on the budget)."""
    device_type = torch.device(device).type
    models = len(shape.names)
    params = shape.parameters()
    largest = shape.largest
    itemsize = getattr(torch, dtype).itemsize
    parts = []
    stored = sum(shape.stored_bytes(m) for m in shape.names)
    stored_names = sorted({str(t.stored[m]).removeprefix("torch.") for t in shape.tensors for m in shape.names})
    on = "in memory" if device_type == "cpu" else "on the device"
    if placement == "resident":
        parts.append(Part("sources", "sources", "device", 4 * params * models, f"{models} models in float32 {on}"))
    else:
        where = "host" if placement == "streamed" else "device"
        on = on if where == "device" else "in host memory" + (" (pinned)" if device_type == "cuda" else "")
        parts.append(Part("sources", "sources", where, stored, f"{models} models as stored ({'/'.join(stored_names)}) {on}"))
    out = 4 * largest if dtype != "float32" else 0
    if placement == "resident":
        staging, what = out, "a float32 output buffer" if out else "none (float32 output written in place)"
    else:
        # a host-to-device copy_ with a dtype change stages the stored bytes on the device first
        copy = largest * max((t.stored[m].itemsize for t in shape.tensors for m in shape.names), default=4)
        transfer = copy if placement == "streamed" and device_type == "cuda" else 0
        staging = 4 * largest * models + out + transfer
        what = f"float32 buffers of the largest tensor ({largest / 1e6:,.1f} M entries) for {models} models" + (
            " and the output" if out else "") + (" and the host-to-device copy" if transfer else "")
    parts.append(Part("staging", "staging buffers", "device", staging, what))
    parts.append(Part("merged", "merged model", "device", shape.skeleton[dtype], f"the live model in {dtype}"))
    evaluation, label = 0, "no evaluation workload given (weights only)"
    for workload in workloads:
        size = evaluation_bytes(shape.dims, workload, itemsize, device_type)
        if size >= evaluation:
            evaluation = size
            label = (f"{workload.name + ': ' if workload.name else ''}batch {workload.batch_size} × "
                     f"{workload.prompt_tokens} + {workload.new_tokens} tokens (KV cache, activations, logits)")
    parts.append(Part("evaluation", "evaluation", "device", evaluation, label))
    runtime = RUNTIME_HOST + (COMPILER_HOST if fused and device_type == "cpu" else 0) + (CUDA_HOST if device_type == "cuda" else 0)
    parts.append(Part("runtime", "runtime", "host", runtime,
                      "Python, torch, transformers, lm-eval" + (", fused merge kernels" if fused and device_type == "cpu" else "")
                      + (", CUDA libraries" if device_type == "cuda" else "")))
    if device_type == "cuda":
        parts.append(Part("cuda", "CUDA context", "device", CUDA_CONTEXT, "context and libraries (estimate)"))
    return parts


def plan_worker(
    shape: PoolShape,
    *,
    device: str,
    dtype: str,
    placement: str,
    cache_memory: int | None,
    operators: Mapping[str, OperatorSpec] | None,
    sources: int,
    workloads: Sequence[Workload],
    capacity: Capacity,
) -> WorkerPlan:
    """The plan of one worker; ``placement`` 'auto' picks the first placement that fits.

    ``operators``: the operator of each tensor (from a recipe of the search space), None for
    blends; ``sources``: how many source models an operator merges (the base not counted).
    """
    fused = switched_on() and bool(operators) and largest_consensus(shape, operators) >= MIN_NUMEL
    costs = _tensor_costs(shape, operators, sources)
    plans = {
        name: _plan_one(shape, costs, device=device, dtype=dtype, placement=name, cache_memory=cache_memory,
                        workloads=workloads, capacity=capacity, fused=fused, chosen_by="experiment" if placement != "auto" else "plan")
        for name in PLACEMENTS
    }
    alternatives = {
        name: {"fits": p.fits, "device_bytes": None if p.on_cpu else p.total("device"), "host_bytes": p.total("host")}
        for name, p in plans.items()
    }
    if placement != "auto":
        chosen = plans[placement]
    else:  # on the device if it fits there, with the most caches (the earlier on a tie); else streamed
        fitting = [p for p in plans.values() if p.fits and p.placement != "streamed"]
        if fitting:
            chosen = max(fitting, key=lambda p: (p.part("caches").bytes, -PLACEMENTS.index(p.placement)))
        else:
            chosen = plans["streamed"]
    chosen.alternatives = alternatives
    if not chosen.fits:
        chosen.problem = _refusal(chosen, plans, shape, workloads, placement)
    if shape.config_only:
        chosen.notes.append("models described by config.json only: plannable, not runnable")
    return chosen


def largest_consensus(shape: PoolShape, operators: Mapping[str, OperatorSpec]) -> int:
    """Entries of the largest tensor merged by a sign-consensus operator (fused kernels compile above MIN_NUMEL)."""
    return max((t.numel for t in shape.tensors if (op := operators.get(t.name)) is not None and op.name in CONSENSUS_OPERATORS),
               default=0)


def _plan_one(
    shape: PoolShape,
    costs: Sequence[tuple[int, int, int, int]],
    *,
    device: str,
    dtype: str,
    placement: str,
    cache_memory: int | None,
    workloads: Sequence[Workload],
    capacity: Capacity,
    fused: bool,
    chosen_by: str,
) -> WorkerPlan:
    parts = _parts(shape, device=device, dtype=dtype, placement=placement, workloads=workloads, fused=fused)
    plan = WorkerPlan(device, dtype, placement, chosen_by, parts, capacity, 0, 0, 0, len(costs), cache_memory is not None)
    base_work = max((max(uncached, cached) for _, _, uncached, cached in costs), default=0)
    # reserve the largest working memory a merge call may need, give the caches the rest
    memory = "host" if plan.on_cpu else "device"
    limit = plan.limit(memory)
    if cache_memory is not None:
        budget = cache_memory
    elif limit is None:
        budget = sum(c for _, c, _, _ in costs)
    else:
        budget = max(0, limit - plan.total(memory) - base_work)
    wanted, admitted, cached, work = admit_caches(costs, budget)
    plan.cache_wanted, plan.cache_budget, plan.cached_tensors = wanted, budget, cached
    plan.parts.insert(3, Part("caches", "operator caches", "device", admitted,
                              f"{cached} of {len(costs)} tensors cached" + (f" ({format_size(wanted)} wanted)" if admitted < wanted else "")))
    plan.parts.insert(4, Part("merge_work", "merge working memory", "device", work,
                              "the largest merge call's temporaries (uncached tensors hold their task vectors)"))
    for where in ("device", "host"):
        limit = plan.limit(where)
        if limit is not None and plan.total(where) > limit:
            plan.over = where
    return plan


def _refusal(
    plan: WorkerPlan, plans: Mapping[str, WorkerPlan], shape: PoolShape, workloads: Sequence[Workload], asked: str
) -> str:
    """One line: the part that does not fit, where, and what would fit instead."""
    where = plan.over or "device"
    memory = "the host" if where == "host" or plan.on_cpu else f"the device ({plan.device})"
    limit = plan.limit(where) or 0
    parts = [p for p in plan.parts if (plan.on_cpu or p.where == where) and p.bytes]
    biggest = max(parts, key=lambda p: p.bytes)
    head = (f"the worker does not fit {memory}: {plan.placement} placement needs {format_size(plan.total(where))} of "
            f"{format_size(limit)} usable ({format_size((plan.capacity.host if where == 'host' else plan.capacity.device) or 0)} "
            f"available, {RESERVE:.0%} kept free); the largest part is {biggest.label} ({format_size(biggest.bytes)})")
    return f"{head}; {_option(plan, plans, shape, workloads, asked)}"


def _option(plan: WorkerPlan, plans: Mapping[str, WorkerPlan], shape: PoolShape, workloads: Sequence[Workload], asked: str) -> str:
    """The first change that would fit: another placement, bfloat16, a smaller batch, more memory."""
    if asked != "auto":
        for name, other in plans.items():
            if other.fits:
                return f"executor.placement: {name} would fit"
    where = plan.over or "device"
    over = plan.total(where) - (plan.limit(where) or 0)
    caches = plan.part("caches").bytes
    if plan.cache_explicit and caches >= over:
        return f"executor.cache_memory: {format_size(max(0, caches - over))} (or auto) would fit"
    if plan.dtype == "float32" and plan.part("merged").bytes // 2 >= over:
        return "executor.dtype: bfloat16 would fit (the merged model in half the memory)"
    evaluation = plan.part("evaluation")
    if evaluation.bytes > over and workloads:
        largest = max(workloads, key=lambda w: evaluation_bytes(shape.dims, w, 4, "cpu"))
        batch = largest.batch_size
        while batch > 1 and evaluation_bytes(shape.dims, largest.model_copy(update={"batch_size": batch}), getattr(torch, plan.dtype).itemsize,
                                             torch.device(plan.device).type) > evaluation.bytes - over:
            batch //= 2
        if batch < largest.batch_size and batch >= 1:
            return f"fitness batch_size {batch} would fit (an evaluation batch of {largest.batch_size} is {format_size(evaluation.bytes)})"
    flag = "--host-memory" if where == "host" or plan.on_cpu else "--device-memory"
    return f"it needs {format_size(plan.total(where) / (1 - RESERVE))} available ({flag} to plan for a larger one)"
