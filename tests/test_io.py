"""Safetensors reading (lazy index, error paths) and the streaming shard writer."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from evomerge.errors import ModelError
from evomerge.io import (
    ShardedSafetensorsWriter,
    TensorIndex,
    TensorSpec,
    read_config,
    read_safetensors_header,
)


def _header_json(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return length, json.loads(raw[8 : 8 + length])


# --- reader -------------------------------------------------------------------------------------


def test_sharded_and_single_file_read_the_same_tensors_bit_exactly(make_pico):
    single = make_pico(seed=7)
    sharded = make_pico(seed=7, sharded=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    with TensorIndex.open(single) as a, TensorIndex.open(sharded) as b:
        assert len(a.files) == 1 and len(b.files) >= 3
        assert a.names == b.names
        assert len(a.names) == 21
        for name in a.names:
            assert a.shape(name) == b.shape(name)
            assert a.dtype(name) == b.dtype(name) == torch.float32
            assert torch.equal(a.get(name), b.get(name))
        assert b.file("model.embed_tokens.weight").name.startswith("model-0000")


def test_index_reports_shape_dtype_and_size(make_pico):
    folder = make_pico(dtype=torch.bfloat16)
    with TensorIndex.open(folder) as index:
        assert index.shape("model.embed_tokens.weight") == (64, 32)
        assert index.shape("model.layers.1.self_attn.k_proj.weight") == (16, 32)
        assert index.dtype("model.norm.weight") == torch.bfloat16
        assert index.nbytes("model.embed_tokens.weight") == 64 * 32 * 2
        assert "lm_head.weight" in index and "nope" not in index
        with pytest.raises(KeyError, match="nope"):
            index.shape("nope")


def test_names_are_in_natural_order(make_pico):
    with TensorIndex.open(make_pico(layers=11)) as index:
        layers = [int(n.split(".")[2]) for n in index.names if n.startswith("model.layers.")]
        assert layers == sorted(layers)
        assert layers[-1] == 10
        assert index.names[0] == "lm_head.weight" and index.names[-1] == "model.norm.weight"


def test_get_returns_an_owned_copy_with_requested_dtype(make_pico):
    with TensorIndex.open(make_pico(dtype=torch.bfloat16)) as index:
        first = index.get("model.norm.weight")
        expected = first.clone()
        first.add_(100)
        assert torch.equal(index.get("model.norm.weight"), expected)
        upcast = index.get("model.norm.weight", device="cpu", dtype=torch.float32)
        assert upcast.dtype == torch.float32
        assert torch.equal(upcast, expected.float())
        index.close()
        assert torch.equal(index.get("model.norm.weight"), expected)


def test_missing_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match=r"model folder not found: .*nowhere"):
        TensorIndex.open(tmp_path / "nowhere")


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ModelError) as err:
        TensorIndex.open(tmp_path)
    message = str(err.value)
    assert "only pickle weights (pytorch_model.bin)" in message
    assert "safetensors" in message and "\n" not in message


def test_folder_without_weights(tmp_path):
    with pytest.raises(ModelError, match="no model.safetensors or model.safetensors.index.json"):
        TensorIndex.open(tmp_path)


def test_index_pointing_to_a_missing_shard(make_pico):
    folder = make_pico(sharded=True)
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    (folder / shard).unlink()
    with pytest.raises(ModelError, match=rf"index.json: lists shard '{shard}' for '.*', but .*{shard} does not exist"):
        TensorIndex.open(folder)


def test_index_listing_a_tensor_its_shard_lacks(make_pico):
    folder = make_pico(sharded=True)
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.ghost.weight"] = shard
    path.write_text(json.dumps(index))
    with pytest.raises(ModelError, match=rf"{shard}: has no tensor 'model.ghost.weight'"):
        TensorIndex.open(folder)


def test_index_that_is_not_json(make_pico):
    folder = make_pico(sharded=True)
    (folder / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(ModelError, match=r"model.safetensors.index.json: not valid JSON"):
        TensorIndex.open(folder)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x01\x02", "shorter than the 8-byte header length"),
        ((10**6).to_bytes(8, "little") + b"{}", "header length 1000000 exceeds the file size 10"),
        ((4).to_bytes(8, "little") + b"oops", "header is not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "header is not a JSON object"),
    ],
)
def test_corrupt_header_names_the_file(tmp_path, content, reason):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ModelError) as err:
        TensorIndex.open(tmp_path)
    assert str(err.value) == f"{tmp_path / 'model.safetensors'}: corrupt safetensors file ({reason})"


def test_truncated_file_is_caught_at_open(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(8), "b": torch.ones(4)}, str(path))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ModelError, match=r"corrupt safetensors file \(tensor '.' has data offsets .* outside"):
        TensorIndex.open(tmp_path)


def test_header_with_wrong_byte_count(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ModelError, match=r"tensor 'a' has 8 bytes for shape \[3\]"):
        read_safetensors_header(path)


def test_read_config_errors(tmp_path):
    with pytest.raises(ModelError, match=r"model folder not found"):
        read_config(tmp_path / "none")
    with pytest.raises(ModelError, match=r"config.json: file not found"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"config.json: expected a JSON object, got list"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(ModelError, match=r"config.json: not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert read_config(tmp_path) == {"model_type": "llama"}


# --- writer -------------------------------------------------------------------------------------


def _mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "tok.bf16": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
        "a.f32": torch.randn(7, generator=gen),
        "b.f16": torch.randn(3, 3, generator=gen).to(torch.float16),
        "ids.i64": torch.arange(5, dtype=torch.int64) - 2,
        "mask.bool": torch.tensor([True, False, True]),
        "q.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "scalar.f32": torch.tensor(3.25),
        "empty.f32": torch.zeros(0, 4),
        "c.f64": torch.randn(2, generator=gen, dtype=torch.float64),
    }


def _write(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> tuple[Path, ...]:
    specs = [(name, t.shape, t.dtype) for name, t in tensors.items()]
    writer = ShardedSafetensorsWriter(out, specs, max_shard_bytes=max_shard_bytes)
    with writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return writer.files


@pytest.mark.parametrize("max_shard_bytes", [None, 10**6, 40, 1])
def test_writer_round_trip_is_bit_exact(tmp_path, max_shard_bytes):
    tensors = _mixed_tensors()
    files = _write(tmp_path, tensors, max_shard_bytes)
    loaded: dict[str, torch.Tensor] = {}
    for path in files:
        loaded.update(load_file(str(path)))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].view(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    if max_shard_bytes in (None, 10**6):
        assert [p.name for p in files] == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        assert index["metadata"] == {"total_size": total}
        assert list(index["weight_map"]) == list(tensors)
        assert set(index["weight_map"].values()) == {p.name for p in files}
        assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
        if max_shard_bytes == 1:
            assert len(files) == len(tensors)
    with TensorIndex.open(tmp_path) as index:
        for name, tensor in tensors.items():
            assert torch.equal(index.get(name), tensor)


@pytest.mark.parametrize("max_shard_bytes", [None, 60])
def test_writer_files_have_aligned_headers_metadata_and_mode_0644(tmp_path, max_shard_bytes):
    tensors = _mixed_tensors()
    previous = os.umask(0o077)
    try:
        _write(tmp_path, tensors, max_shard_bytes)
    finally:
        os.umask(previous)
    written = sorted(tmp_path.iterdir())
    assert not [p for p in written if p.name.endswith(".partial")]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
        if path.suffix != ".safetensors":
            continue
        length, header = _header_json(path)
        assert (8 + length) % 8 == 0
        assert header.pop("__metadata__") == {"format": "pt"}
        spans = sorted(tuple(spec["data_offsets"]) for spec in header.values())
        assert spans[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert path.stat().st_size == 8 + length + spans[-1][1]
        for name, spec in header.items():
            assert spec["data_offsets"][0] % tensors[name].element_size() == 0, name


def test_writer_streams_each_shard_when_complete(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(3)}
    specs = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=16)
    writer.write("t0", tensors["t0"])
    assert (tmp_path / "model-00001-of-00003.safetensors").is_file()
    assert not (tmp_path / "model-00002-of-00003.safetensors").exists()
    assert torch.equal(load_file(str(tmp_path / "model-00001-of-00003.safetensors"))["t0"], tensors["t0"])
    writer.write("t1", tensors["t1"])
    writer.write("t2", tensors["t2"])
    files = writer.close()
    assert [p.name for p in files][-1] == "model.safetensors.index.json"


def test_writer_rejects_out_of_order_and_mismatched_tensors(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    writer = ShardedSafetensorsWriter(tmp_path, specs)
    with pytest.raises(ValueError, match="expected tensor 'a' next, got 'b'"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match=r"declared \[2\] torch.float32, got \[3\] torch.float32"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match=r"declared \[2\] torch.float32, got \[2\] torch.bfloat16"):
        writer.write("a", torch.zeros(2, dtype=torch.bfloat16))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'b' was declared but never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_removes_partial_files_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        specs = [("a", (2,), torch.float32), ("b", (2,), torch.float32)]
        with ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=8) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_validates_its_declaration(tmp_path):
    with pytest.raises(ValueError, match="at least one tensor"):
        ShardedSafetensorsWriter(tmp_path, [])
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        ShardedSafetensorsWriter(tmp_path, [("a", (1,), torch.float32), ("a", (1,), torch.float32)])
    with pytest.raises(ValueError, match="cannot store dtype torch.complex64"):
        ShardedSafetensorsWriter(tmp_path, [("a", (1,), torch.complex64)])
    with pytest.raises(ValueError, match="max_shard_bytes must be positive"):
        ShardedSafetensorsWriter(tmp_path, [("a", (1,), torch.float32)], max_shard_bytes=0)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match=r"already holds model weights \(model.safetensors\)"):
        ShardedSafetensorsWriter(tmp_path, [("a", (1,), torch.float32)])


@pytest.mark.parametrize(
    ("dtype", "max_shard_bytes"), [(torch.float32, None), (torch.bfloat16, 3000), (torch.float16, 5000)]
)
def test_written_model_loads_with_transformers(make_pico, tmp_path, dtype, max_shard_bytes):
    source = make_pico(arch="qwen2", dtype=dtype, seed=3)
    out = tmp_path / "copy"
    with TensorIndex.open(source) as index:
        specs = [(n, index.shape(n), index.dtype(n)) for n in index.names]
        with ShardedSafetensorsWriter(out, specs, max_shard_bytes=max_shard_bytes) as writer:
            for name in index.names:
                writer.write(name, index.get(name))
    shutil.copy(source / "config.json", out / "config.json")
    ids = torch.tensor([[1, 5, 14, 6, 16, 7]])
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    copied = AutoModelForCausalLM.from_pretrained(out).eval()
    assert copied.dtype == dtype
    with torch.no_grad():
        assert torch.equal(original(ids).logits, copied(ids).logits)
