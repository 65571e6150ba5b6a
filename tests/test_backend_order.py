"""The measured backend order per device kind (:mod:`convnext_fast.backends.order`): an entry for
the device's kind (CUDA capability, CPU ISA) wins over the device type's shipped default, the newest
of two wins, an unknown kind falls back to the default, and ``select`` follows it.

Every test reads a temporary table (the loaded records monkeypatched), never the shipped file; a GPU
is simulated with fake CUDA tensors and patched device queries.
"""
import json

import pytest
import torch

from convnext_fast import backends
from convnext_fast.backends import order
from convnext_fast.bench import STAGES, backend_order_entries
from convnext_fast.specs import SPECS

BF16, FP32 = torch.bfloat16, torch.float32


def _entry(order_, kind=None, date="2026-11", device="cpu", op="mlp", dtype="bf16", training=False,
           where="box"):
    e = {"op": op, "device": device, "dtype": dtype, "training": training, "order": list(order_),
         "measured": {"device": where, "commit": "abc1234", "date": date}}
    if kind:
        e["kind"] = kind
    return e


@pytest.fixture
def records(monkeypatch):
    """``records(*entries, cpu="avx2")``: the selection reads ``entries`` (restored afterwards) on
    a CPU of kind ``cpu``; device kinds and orders are found afresh."""
    monkeypatch.setattr(order, "_ENTRIES", order._ENTRIES)
    monkeypatch.setattr(order, "_TABLE", order._TABLE)
    monkeypatch.setattr(order, "_KINDS", {})
    monkeypatch.setattr(order, "_ORDERS", {})

    def use(*entries, cpu="avx2"):
        monkeypatch.setattr(order, "cpu_kind", lambda: cpu)
        order._KINDS.clear()
        order._set_entries(entries)

    return use


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(8, 6)``: torch sees a CUDA device of that capability (device kinds found afresh)."""
    def use(major, minor):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        order._KINDS.clear()
        order._ORDERS.clear()

    return use


@pytest.mark.parametrize("isa, amx, bf16, want", [
    ("AVX2", False, False, "avx2"), ("AVX512", False, False, "avx512"),
    ("AVX512", False, True, "avx512_bf16"), ("AVX512", True, True, "amx"), ("DEFAULT", False, False, "default")])
def test_cpu_kind_from_the_cpu_flags(monkeypatch, isa, amx, bf16, want):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    assert order.cpu_kind() == want


def test_cpu_kind_without_torch_cpu_probes_asks_onednn(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert order.cpu_kind() == "avx512_bf16"


def test_this_machine_has_a_kind():
    assert order.device_kind("cpu") == order.cpu_kind() != ""
    if not torch.cuda.is_available():
        assert order.device_kind(torch.device("cuda", 0)) == ""


def test_kind_entry_wins_over_the_default_and_unknown_kinds_fall_back(records):
    records(_entry(["torch", "cpu"]), _entry(["cpu", "torch"], kind="avx512_bf16"), cpu="avx512_bf16")
    assert order.auto_order("mlp", torch.device("cpu"), BF16) == ("cpu", "torch")
    records(_entry(["torch", "cpu"]), _entry(["cpu", "torch"], kind="avx512_bf16"), cpu="amx")
    assert order.auto_order("mlp", "cpu", BF16) == ("torch", "cpu")
    # no entry at all for this dtype / this mode: the built-in default
    assert order.auto_order("mlp", "cpu", FP32) == order.DEFAULT_ORDER["cpu"]
    assert order.auto_order("mlp", "cpu", BF16, training=True) == order.DEFAULT_ORDER["cpu"]


def test_newest_of_two_matching_entries_wins(records):
    newer = _entry(["torch", "cpu"], "avx2", date="2026-12-01")
    older = _entry(["cpu", "torch"], "avx2", date="2026-11-30")
    records(newer, older)
    assert order.auto_order("mlp", "cpu", BF16) == ("torch", "cpu")
    records(older, newer)
    assert order.auto_order("mlp", "cpu", BF16) == ("torch", "cpu")
    # the same date: the later in the file
    records(_entry(["cpu", "torch"], "avx2"), _entry(["torch", "cpu"], "avx2"))
    assert order.auto_order("mlp", "cpu", BF16) == ("torch", "cpu")


def test_source_says_which_entry(records, gpu):
    records(_entry(["cpu", "torch"], where="EPYC"), _entry(["torch", "cpu"], "avx512_bf16", date="2027-01-02",
                                                           where="Xeon"),
            _entry(["triton", "torch"], device="cuda", where="H100"), cpu="avx512_bf16")
    assert order.source("mlp", "cpu", BF16) == "measured on Xeon (avx512_bf16) at abc1234, 2027-01-02"
    assert order.source("mlp", "cpu", FP32) == "default (no measurement for this case)"
    gpu(8, 9)
    assert order.device_kind("cuda:0") == "sm_89"
    assert order.source("mlp", "cuda:0", BF16) == (
        "shipped default entry (no record for sm_89): measured on H100 at abc1234, 2026-11")
    records(_entry(["cpu", "torch"], where="EPYC"), cpu="")
    assert order.source("mlp", "cpu", BF16) == "shipped default entry: measured on EPYC at abc1234, 2026-11"


def test_merge_keeps_the_default_beside_a_kind(tmp_path, records):
    records()
    path = str(tmp_path / "order.json")
    order.merge([_entry(["cpu", "torch"])], path)
    order.merge([_entry(["torch", "cpu"], kind="amx")], path)
    assert {(e.get("kind"), tuple(e["order"])) for e in order.load(path)} == {
        (None, ("cpu", "torch")), ("amx", ("torch", "cpu"))}
    order.merge([_entry(["cpu"], kind="amx", date="2027-02-03")], path)  # same key: replaced
    assert {(e.get("kind"), tuple(e["order"])) for e in order.load(path)} == {
        (None, ("cpu", "torch")), ("amx", ("cpu",))}
    assert order.table() == {}  # another file: the loaded records stay


def _select_dwconv(device_args):
    return backends.select("dwconv_ln", device_args[0].device, None, SPECS["dwconv_ln"].bind(device_args))[0]


def test_select_follows_the_gpus_kind(records, gpu, replace_backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # shapes and devices only: no GPU needed, nothing runs
        C = 96
        x = torch.empty(1, C, 14, 14, device="cuda:0", dtype=BF16).contiguous(memory_format=torch.channels_last)
        args = (x, torch.empty(C, 1, 7, 7, device="cuda:0", dtype=BF16),
                *(torch.empty(C, device="cuda:0", dtype=BF16) for _ in range(3)), 1e-6)
    for b in ("cuda", "torch"):
        replace_backend("dwconv_ln", b, available=lambda: None, supports=lambda **a: None)
    records(_entry(["torch", "cuda"], op="dwconv_ln", device="cuda"),
            _entry(["cuda", "torch"], kind="sm_86", op="dwconv_ln", device="cuda"))
    gpu(8, 6)
    assert _select_dwconv(args) == "cuda"
    gpu(9, 0)  # no record for sm_90: the default entry
    assert _select_dwconv(args) == "torch"


def test_kind_lookup_compiles_once_without_a_graph_break(records):
    """Traced with the kind not yet known, then eager calls fill the caches: no recompile."""
    from torch._dynamo.testing import CompileCounter

    records(_entry(["cpu", "torch"], dtype="fp32"), _entry(["torch", "cpu"], kind="avx2", dtype="fp32"))

    def f(x):
        first = order.auto_order("mlp", x.device, x.dtype)[0]
        return x + (1 if first == "torch" else 2)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    try:
        x = torch.zeros(2)
        assert compiled(x).tolist() == [1.0, 1.0] and order._KINDS == {}
        assert f(x).tolist() == [1.0, 1.0] and order._KINDS  # eager: cached
        assert compiled(x).tolist() == [1.0, 1.0] and counter.frame_count == 1
    finally:
        torch._dynamo.reset()


def test_bench_entries_carry_the_kind_measured(records):
    records(cpu="avx2")
    rows = [{"op": "mlp", "backend": b, "mode": "fwd", "device": device, "dtype": "bf16", "shape": [8, C, H, H],
             "ms": ms} for device in ("cuda:0", "cpu") for b, ms in (("torch", 1.0), ("triton", 2.0))
            for C, H, _ in STAGES]
    by_device = {e["device"]: e for e in backend_order_entries(rows, {"gpu": "H200", "capability": "9.0"}, "here")}
    assert by_device["cuda"]["kind"] == "sm_90" and by_device["cuda"]["measured"]["capability"] == "9.0"
    assert by_device["cpu"]["kind"] == "avx2"
    (entry,) = backend_order_entries(rows[:len(STAGES) * 2], {"gpu": "H200"}, "here")
    assert "kind" not in entry  # the capability unknown: a default entry


def test_shipped_records():
    """A kind-specific entry names a kind that order.cpu_kind / cuda_kind can report (other kinds
    keep the default entry or DEFAULT_ORDER), and a CPU kind's entry records the CPU's flags."""
    import re

    with open(order.PATH) as f:
        entries = json.load(f)["entries"]
    assert any("kind" not in e for e in entries)
    for e in entries:
        if "kind" in e:
            if e["device"] == "cuda":
                assert re.fullmatch(r"sm_\d+", e["kind"]), e
            else:  # amx, avx512_bf16, or torch's ISA name (avx512, avx2, ...), with the flags seen
                assert re.fullmatch(r"[a-z][a-z0-9_]*", e["kind"]) and e["measured"].get("cpu_flags"), e
    assert {e["measured"].get("capability") for e in entries if e["device"] == "cuda"} == {"9.0"}
