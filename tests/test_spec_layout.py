"""ExpertSpec / TensorSpec validation, record layout, resident slab views, package layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import expert_store as es
from expert_store.layout import REGION_ALIGN, ResidentSlabs, SlabLayout
from expert_store.spec import RECORD_ALIGN

ALL_DTYPES = [
    torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16, torch.float32,
    torch.int8, torch.uint8, torch.int32,
]  # fmt: skip


def _spec(*parts):
    return es.ExpertSpec([es.TensorSpec(n, s, d) for n, s, d in parts])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_is_accepted(dtype):
    """Every dtype an engine uses for experts (fp8 and scales included) makes a valid spec."""
    spec = _spec(("w", (3, 5), dtype))
    assert spec.nbytes == 15 * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize(
    "parts,match",
    [
        ([("w", (4,), torch.float32), ("w", (4,), torch.float32)], "duplicate tensor name 'w'"),
        ([("w", (0, 4), torch.float32)], "'w'.*positive"),
        ([("w", (-1,), torch.float32)], "'w'.*positive"),
        ([("w", (), torch.float32)], "'w'.*at least one dimension"),
        ([("w", (2.0,), torch.float32)], "'w'.*positive int"),
        ([("w", (2,), "float32")], "'w'.*torch.dtype"),
        ([("", (2,), torch.float32)], "non-empty"),
        ([("w", (2,), torch.complex64)], "not supported"),
    ],
)
def test_bad_specs_raise_spec_error(parts, match):
    """Bad specs raise SpecError (a StoreError) naming the tensor at fault."""
    with pytest.raises(es.SpecError, match=match):
        _spec(*parts)
    assert issubclass(es.SpecError, es.StoreError)


def test_empty_spec_and_wrong_items():
    with pytest.raises(es.SpecError):
        es.ExpertSpec([])
    with pytest.raises(es.SpecError, match="TensorSpec"):
        es.ExpertSpec([("w", (2,), torch.float32)])


def test_record_layout_is_16_byte_aligned_and_word_size_is_widest():
    """Each tensor of a record starts on a 16-byte boundary; record_bytes is padded; nbytes is exact."""
    spec = _spec(("a", (3,), torch.uint8), ("b", (5,), torch.float32), ("c", (1,), torch.bfloat16))
    assert spec.record_offsets == (0, 16, 48)
    assert spec.nbytes == 3 + 20 + 2
    assert spec.record_bytes == 64 and spec.record_bytes % RECORD_ALIGN == 0
    assert spec.word_bytes == 1
    assert _spec(("a", (3,), torch.bfloat16), ("b", (3,), torch.float32)).word_bytes == 2
    assert _spec(("a", (4,), torch.float32)).word_bytes == 4


def test_spec_round_trip_and_equality():
    spec = _spec(("w13", (256, 128), torch.float8_e4m3fn), ("s", (2, 1), torch.float32))
    again = es.ExpertSpec.from_list(spec.to_list())
    assert again == spec and hash(again) == hash(spec)
    assert spec["s"].shape == (2, 1) and spec.index("s") == 1
    with pytest.raises(es.SpecError, match="no tensor 'x'"):
        spec.index("x")


def test_resident_views_are_contiguous_zero_copy_and_stable():
    """weights(name, layer) is a contiguous [S, *shape] view into the one allocation, aligned, and
    writing through it changes exactly the bytes the layout says."""
    spec = _spec(("w13", (6, 5), torch.bfloat16), ("scale", (1,), torch.float32), ("w2", (3, 3), torch.float8_e5m2))
    layout = SlabLayout.build(spec, num_layers=3, slots=4)
    slabs = ResidentSlabs(layout, "cpu", fill=0)
    base = slabs.storage.data_ptr()
    for layer in range(3):
        for i, t in enumerate(spec.tensors):
            v = slabs.weights(t.name, layer)
            assert v.shape == (4, *t.shape) and v.dtype == t.dtype and v.is_contiguous()
            start = v.data_ptr() - base
            assert start == layout.slot_offset(layer, 0, i) and start % REGION_ALIGN == 0
            assert slabs.weights(t.name, layer).data_ptr() == v.data_ptr()
    slabs.weights("w2", 2)[3].view(torch.uint8).fill_(7)
    off = layout.slot_offset(2, 3, 2)
    assert torch.equal(slabs.storage[off : off + 9], torch.full((9,), 7, dtype=torch.uint8))
    assert int(slabs.storage.count_nonzero()) == 9
    with pytest.raises(es.StoreError, match=r"layer must be in 0\.\.2, got 3"):
        slabs.weights("w2", 3)


def test_kernels_install_under_the_package_namespace(tmp_path):
    """The kernels/ folder is importable as expert_store.kernels and never as a top-level `kernels`
    (a PyPI package of that name exists). Checked in a fresh interpreter outside the checkout, so
    the repository root is not on sys.path."""
    import expert_store.kernels as k

    ours = Path(k.__file__).resolve().parent
    assert ours.name == "kernels"
    code = (
        "import importlib.util, expert_store.kernels as k; s = importlib.util.find_spec('kernels'); "
        "print(k.__file__); print(s.origin if s else None)"
    )
    env = {key: v for key, v in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernels_file, top_level = out.stdout.split("\n")[:2]
    assert Path(kernels_file).resolve().parent == ours
    assert top_level == "None" or Path(top_level).resolve().parent != ours


def test_presets_match_the_models():
    """DeepSeek-V3 and Qwen3-30B-A3B expert specs: shapes, dtypes and sizes as in their checkpoints."""
    ds = es.presets.deepseek_v3_spec()
    assert [(t.name, t.shape, t.dtype) for t in ds] == [
        ("w13", (4096, 7168), torch.float8_e4m3fn),
        ("w13_scale", (32, 56), torch.float32),
        ("w2", (7168, 2048), torch.float8_e4m3fn),
        ("w2_scale", (56, 16), torch.float32),
    ]
    assert ds.nbytes == 4096 * 7168 + 32 * 56 * 4 + 7168 * 2048 + 56 * 16 * 4
    qw = es.presets.qwen3_moe_spec()
    assert qw.nbytes == (1536 * 2048 + 2048 * 768) * 2 and qw["w13"].dtype == torch.bfloat16
    assert set(es.presets.deepseek_v3_names()) == set(ds.names)
    assert set(es.presets.qwen3_moe_names()) == set(qw.names)
