"""What a model fingerprint costs for a 7B-parameter source, against hashing every byte.

Writes (once, into ``--dir``) a model folder shaped like Llama-2-7B in bfloat16: 32 layers,
hidden 4096, MLP 11008, vocabulary 32000 — 291 tensors, 6.7 B parameters, 13.5 GB in three
safetensors shards of random bytes plus config.json and the shard index. Then times, each with the
folder's pages evicted from the page cache first (``posix_fadvise(DONTNEED)``: a cold start, as
after a reboot or on a network file system) and again warm:

* ``fingerprint_model`` — headers, sizes and ``SAMPLES_PER_TENSOR`` × ``SAMPLE_BYTES`` of every
  tensor (the fingerprint ``run``, ``resume`` and ``evaluate`` take of every source model);
* a full BLAKE2b of every byte of every file (the alternative: exact, but reads the whole model).

Prints seconds and the ratio full / fingerprint. The folder is kept for reruns (``--clean`` deletes it).

    python benchmarks/fingerprint.py [--dir /tmp/evomerge-fingerprint-7b] [--clean]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from evomerge.pool.fingerprint import (
    SAMPLE_BYTES,
    SAMPLES_PER_TENSOR,
    fingerprint_model,
)

LAYERS, HIDDEN, FFN, VOCAB = 32, 4096, 11008, 32000
SHARDS = 3


def tensors() -> list[tuple[str, list[int]]]:
    names = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        names += [(p + f"self_attn.{x}_proj.weight", [HIDDEN, HIDDEN]) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", [FFN, HIDDEN]), (p + "mlp.up_proj.weight", [FFN, HIDDEN])]
        names += [(p + "mlp.down_proj.weight", [HIDDEN, FFN])]
        names += [(p + "input_layernorm.weight", [HIDDEN]), (p + "post_attention_layernorm.weight", [HIDDEN])]
    return names + [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]


def write_model(folder: Path) -> None:
    """Three bf16 shards of random bytes with valid safetensors headers, config and index."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = tensors()
    per_shard = -(-len(entries) // SHARDS)
    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(SHARDS):
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        header, offset = {}, 0
        for tensor, shape in entries[s * per_shard : (s + 1) * per_shard]:
            size = int(np.prod(shape)) * 2
            header[tensor] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            weight_map[tensor] = name
            offset += size
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with (folder / name).open("wb") as handle:
            handle.write(len(raw).to_bytes(8, "little") + raw)
            left = offset
            while left:
                chunk = min(left, 64 << 20)
                handle.write(rng.bytes(chunk))
                left -= chunk
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))


def evict(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def full_hash(folder: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(folder.iterdir()):
        with path.open("rb") as handle:
            while chunk := handle.read(16 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def timed(fn, folder: Path, cold: bool) -> float:
    if cold:
        evict(folder)
    start = time.perf_counter()
    fn(folder)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/evomerge-fingerprint-7b")
    parser.add_argument("--clean", action="store_true", help="delete the model folder afterwards")
    args = parser.parse_args()
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        start = time.perf_counter()
        write_model(folder)
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"model: {len(tensors())} tensors, {size / 1e9:.1f} GB; fingerprint reads "
          f"{SAMPLES_PER_TENSOR} x {SAMPLE_BYTES} B per tensor")
    rows = []
    for label, fn in (("fingerprint", fingerprint_model), ("full BLAKE2b", full_hash)):
        cold = timed(fn, folder, cold=True)
        warm = timed(fn, folder, cold=False) if label == "fingerprint" else None
        rows.append((label, cold, warm))
        print(f"  {label:<14} cold {cold:8.3f} s" + ("" if warm is None else f"   warm {warm:.3f} s"))
    print(f"  full / fingerprint (cold): {rows[1][1] / rows[0][1]:.0f}x")
    if args.clean:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
