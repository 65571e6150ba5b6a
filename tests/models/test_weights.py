"""Checkpoint loading: timm / official / Hugging Face names, .pth/.bin/.safetensors, strict errors,
and ``from_timm``. Checkpoints are made in the test by renaming a (randomised) timm state_dict the
way those projects name their keys."""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import convnext_fast
from convnext_fast.models import (CheckpointError, ConvNeXt, ConvNeXtFeatures, convert_state_dict,
                                  create_model, from_timm, load_pretrained)
from convnext_fast.models.weights import detect_format

timm = pytest.importorskip("timm")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                r = 0.5 + torch.rand(p.shape, generator=g)
            elif ".grn." in name:
                r = 0.5 * r
            elif name.endswith("weight"):
                r = 1.0 + 0.2 * r
            else:
                r = 0.1 * r
            p.copy_(r)
    return model


# name -> kwargs for both timm and us; the 'tiny' entries are shrunk (Linear MLP path, fast).
CASES = {
    "convnext_atto": {},  # V1, 1x1-conv MLP
    "convnextv2_atto": {},  # V2, 1x1-conv MLP
    "convnext_tiny": dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), num_classes=10),  # V1 Linear MLP
    "convnextv2_tiny": dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), num_classes=10),  # V2 Linear MLP
}

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference():
    """name -> (timm model in eval mode, its timm state_dict, its logits on X)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            t = randomize_(getattr(timm.models.convnext, name)(pretrained=False, **CASES[name])).eval()
            with torch.no_grad():
                ref = t(X)
            cache[name] = (t, {k: v.clone() for k, v in t.state_dict().items()}, ref)
        return cache[name]
    return get


# --------------------------------------------------------------------------------------------
# Renaming timm -> official / Hugging Face (how those projects name the same tensors)
# --------------------------------------------------------------------------------------------

_OFFICIAL = {"conv_dw": "dwconv", "norm": "norm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}
_HF = {"conv_dw": "dwconv", "norm": "layernorm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}


def _block_rest(rest: str, v: torch.Tensor, table, gamma_name, grn_names):
    if rest == "gamma":
        return gamma_name, v
    if rest.startswith("mlp.grn."):
        return grn_names[rest[len("mlp.grn."):]], v.reshape(1, 1, 1, -1)  # [1, 1, 1, D] in both projects
    mod, p = rest.rsplit(".", 1)
    if mod in ("mlp.fc1", "mlp.fc2") and p == "weight":
        v = v.reshape(v.shape[0], v.shape[1])  # nn.Linear in both projects
    return f"{table[mod]}.{p}", v


def _head_key(k: str, norm: str, fc: str) -> str:
    """timm's head.norm.* / head.fc.* under the other project's prefixes."""
    for old, new in (("head.norm.", norm), ("head.fc.", fc)):
        if k.startswith(old):
            return new + k[len(old):]
    raise AssertionError(k)


def to_official(sd):
    out = {}
    for k, v in sd.items():
        if k.startswith("stem."):
            nk = "downsample_layers.0." + k[len("stem."):]
        elif m := re.fullmatch(r"stages\.(\d+)\.downsample\.(\d+)\.(.+)", k):
            nk = f"downsample_layers.{m[1]}.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", k):
            rest, v = _block_rest(m[3], v, _OFFICIAL, "gamma", {"weight": "grn.gamma", "bias": "grn.beta"})
            nk = f"stages.{m[1]}.{m[2]}.{rest}"
        else:
            nk = _head_key(k, norm="norm.", fc="head.")
        out[nk] = v.clone()
    return out


def to_hf(sd, v2: bool):
    pre = "convnextv2." if v2 else "convnext."
    out = {}
    for k, v in sd.items():
        if k.startswith("stem.0."):
            nk = pre + "embeddings.patch_embeddings." + k[len("stem.0."):]
        elif k.startswith("stem.1."):
            nk = pre + "embeddings.layernorm." + k[len("stem.1."):]
        elif m := re.fullmatch(r"stages\.(\d+)\.downsample\.(\d+)\.(.+)", k):
            nk = f"{pre}encoder.stages.{m[1]}.downsampling_layer.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", k):
            rest, v = _block_rest(m[3], v, _HF, "layer_scale_parameter",
                                  {"weight": "grn.weight", "bias": "grn.bias"})
            nk = f"{pre}encoder.stages.{m[1]}.layers.{m[2]}.{rest}"
        else:
            nk = _head_key(k, norm=pre + "layernorm.", fc="classifier.")
        out[nk] = v.clone()
    return out


def write(tmp_path, sd, fmt: str, ext: str, wrap: bool = True) -> str:
    """Write ``sd`` (timm names) renamed to ``fmt`` as a file with extension ``ext``."""
    if fmt == "official":
        sd = to_official(sd)
    elif fmt in ("hf", "hfv2"):
        sd = to_hf(sd, v2=fmt == "hfv2")
    else:
        sd = {k: v.clone() for k, v in sd.items()}
    path = os.path.join(tmp_path, f"ckpt_{fmt}{ext}")
    if ext == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save({"model": sd} if (fmt == "official" and wrap) else sd, path)
    return path


FILES = [("timm", ".pth"), ("timm", ".bin"), ("timm", ".safetensors"), ("official", ".pth"),
         ("official", ".safetensors"), ("hf", ".bin"), ("hf", ".safetensors")]


@pytest.mark.parametrize("fmt,ext", FILES)
@pytest.mark.parametrize("name", list(CASES))
def test_load_formats_give_timm_logits(tmp_path, reference, name, fmt, ext):
    t, sd, ref = reference(name)
    if fmt == "hf" and name.startswith("convnextv2"):
        fmt = "hfv2"
    path = write(tmp_path, sd, fmt, ext)
    m = create_model(name, pretrained=path, **CASES[name]).eval()
    with torch.no_grad():
        out = m(X)
    assert max_rel_err(out, ref) <= 1e-4
    # pathlib paths work too, and the variant functions take pretrained=
    import pathlib
    m2 = getattr(convnext_fast, name)(pretrained=pathlib.Path(path), **CASES[name]).eval()
    for k, v in m2.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_tiny"])
def test_convert_state_dict_round_trip(reference, name):
    _, sd, _ = reference(name)
    model = create_model(name, **CASES[name])
    for fmt, renamed in (("official", {"model": to_official(sd)}),
                         ("hf", to_hf(sd, v2=name.startswith("convnextv2"))), ("timm", sd)):
        assert detect_format(renamed.get("model", renamed)) == fmt
        conv = convert_state_dict(renamed, model)
        assert list(sorted(conv)) == list(sorted(sd)), fmt
        for k in sd:
            assert conv[k].shape == sd[k].shape and torch.equal(conv[k], sd[k]), (fmt, k)


def test_wrappers_and_prefixes(tmp_path, reference):
    t, sd, ref = reference("convnext_atto")
    for i, obj in enumerate(({"state_dict": sd}, {"model_ema": sd, "epoch": 3},
                             {"module." + k: v for k, v in sd.items()},
                             {"state_dict": {"module." + k: v for k, v in sd.items()}})):
        path = os.path.join(tmp_path, f"w{i}.pth")
        torch.save(obj, path)
        m = create_model("convnext_atto", pretrained=path).eval()
        with torch.no_grad():
            assert max_rel_err(m(X), ref) <= 1e-4, i


def test_hf_directory_and_bare_model(tmp_path, reference):
    _, sd, ref = reference("convnextv2_atto")
    d = tmp_path / "hf_model"
    d.mkdir()
    hf = to_hf(sd, v2=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(d / "model.safetensors"))
    m = create_model("convnextv2_atto", pretrained=d).eval()
    with torch.no_grad():
        assert max_rel_err(m(X), ref) <= 1e-4
    # ConvNextV2Model (no 'convnextv2.' prefix, no classifier) -> a num_classes=0 model
    bare = {k[len("convnextv2."):]: v for k, v in hf.items() if k.startswith("convnextv2.")}
    path = str(tmp_path / "bare.bin")
    torch.save(bare, path)
    m0 = create_model("convnextv2_atto", pretrained=path, num_classes=0).eval()
    t0 = timm.create_model("convnextv2_atto", num_classes=0)
    t0.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.fc.")})
    with torch.no_grad():
        assert max_rel_err(m0(X), t0.eval()(X)) <= 1e-4


def test_num_classes_zero_ignores_classifier_and_features_only(tmp_path, reference):
    t, sd, _ = reference("convnext_atto")
    path = write(tmp_path, sd, "official", ".pth")
    m = create_model("convnext_atto", pretrained=path, num_classes=0).eval()
    with torch.no_grad():
        assert max_rel_err(m(X), t.forward_head(t.forward_features(X), pre_logits=True)) <= 1e-4
    f = create_model("convnext_atto", pretrained=path, features_only=True, out_indices=(1, 2)).eval()
    assert isinstance(f, ConvNeXtFeatures)
    with torch.no_grad():
        feats = f(X)
        ref = t.forward_intermediates(X, indices=[1, 2], intermediates_only=True)
    assert [a.shape for a in feats] == [b.shape for b in ref]
    for a, b in zip(feats, ref):
        assert max_rel_err(a, b) <= 1e-5
    # a timm features_only checkpoint (FeatureListNet names) loads into our features model
    tf = timm.create_model("convnext_atto", features_only=True)
    tf.load_state_dict({re.sub(r"^(stem|stages)\.(\d+)\.", r"\1_\2.", k): v
                        for k, v in sd.items() if not k.startswith("head.")})
    fpath = str(tmp_path / "feat.safetensors")
    save_file({k: v.contiguous() for k, v in tf.state_dict().items()}, fpath)
    f4 = create_model("convnext_atto", pretrained=fpath, features_only=True).eval()
    with torch.no_grad():
        for a, b in zip(f4(X), tf.eval()(X)):
            assert max_rel_err(a, b) <= 1e-5


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_missing_key_error_names_the_key(tmp_path, reference):
    _, sd, _ = reference("convnext_atto")
    bad = dict(sd)
    del bad["stages.1.blocks.0.mlp.fc1.bias"]
    path = write(tmp_path, bad, "timm", ".safetensors")
    with pytest.raises(CheckpointError, match=r"missing key 'stages\.1\.blocks\.0\.mlp\.fc1\.bias'") as e:
        create_model("convnext_atto", pretrained=path)
    assert "timm format" in str(e.value) and path in str(e.value)
    # official format: the message names the key in the model's (timm) names, and the format
    off = to_official(sd)
    del off["stages.2.3.gamma"]
    opath = str(tmp_path / "off.pth")
    torch.save({"model": off}, opath)
    with pytest.raises(CheckpointError, match=r"official format.*missing key 'stages\.2\.blocks\.3\.gamma'"):
        create_model("convnext_atto", pretrained=opath)


def test_wrong_shape_error_names_the_key(tmp_path, reference):
    _, sd, _ = reference("convnextv2_atto")
    bad = dict(sd)
    bad["stages.0.blocks.1.conv_dw.weight"] = torch.zeros(40, 1, 5, 5)
    path = write(tmp_path, bad, "timm", ".pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'stages\.0\.blocks\.1\.conv_dw\.weight'.*"
                                              r"\[40, 1, 5, 5\].*\[40, 1, 7, 7\]"):
        create_model("convnextv2_atto", pretrained=path)
    # a different number of classes gets a hint
    with pytest.raises(CheckpointError, match=r"head\.fc\.weight.*num_classes=1000"):
        create_model("convnextv2_atto", pretrained=write(tmp_path, sd, "hfv2", ".bin"), num_classes=10)


def test_unexpected_key_and_bad_files(tmp_path, reference):
    _, sd, _ = reference("convnext_atto")
    extra = dict(sd, **{"stages.3.blocks.2.gamma": torch.ones(320)})
    path = write(tmp_path, extra, "timm", ".pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'stages\.3\.blocks\.2\.gamma'"):
        create_model("convnext_atto", pretrained=path)
    with pytest.raises(CheckpointError, match="not found"):
        create_model("convnext_atto", pretrained=str(tmp_path / "nope.pth"))
    junk = str(tmp_path / "junk.pth")
    torch.save({"foo.weight": torch.zeros(3)}, junk)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format"):
        create_model("convnext_atto", pretrained=junk)
    with pytest.raises(ValueError, match="local"):
        create_model("convnext_atto", pretrained=3)


# --------------------------------------------------------------------------------------------
# from_timm
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_from_timm_same_logits(reference, name):
    t, sd, ref = reference(name)
    m = from_timm(t)
    assert isinstance(m, ConvNeXt) and not m.training
    assert list(m.state_dict()) == list(t.state_dict())
    with torch.no_grad():
        assert max_rel_err(m(X), ref) <= 1e-4


@pytest.mark.parametrize("kwargs", [
    dict(kernel_sizes=(7, 5, 5, 3), conv_bias=False, num_classes=0),
    dict(ls_init_value=None, patch_size=2, head_hidden_size=32, global_pool="max"),
    dict(norm_eps=1e-5, drop_path_rate=0.1, drop_rate=0.2, in_chans=1),
])
def test_from_timm_options(kwargs):
    torch.manual_seed(0)
    t = randomize_(timm.models.convnext.convnext_atto(**kwargs))
    m = from_timm(t)
    assert m.training == t.training
    x = torch.randn(2, kwargs.get("in_chans", 3), 64, 64)
    t.eval()
    m.eval()
    with torch.no_grad():
        ref, out = t(x), m(x)
    assert out.shape == ref.shape and max_rel_err(out, ref) <= 1e-4
    eps = {n: mod.eps for n, mod in t.named_modules() if hasattr(mod, "eps")}
    assert {n: mod.eps for n, mod in m.named_modules() if hasattr(mod, "eps")} == eps
    dp = [getattr(b.drop_path, "drop_prob", 0.0) for s in t.stages for b in s.blocks]
    assert [getattr(b.drop_path, "drop_prob", 0.0) for s in m.stages for b in s.blocks] == pytest.approx(dp)


def test_from_timm_dtype_and_unsupported():
    t = timm.create_model("convnextv2_atto", num_classes=5).to(torch.bfloat16)
    m = from_timm(t)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert all(p.device == torch.device("cpu") for p in m.parameters())
    for k, v in t.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    with pytest.raises(NotImplementedError, match="stem"):
        from_timm(timm.create_model("convnext_atto_ols"))
    with pytest.raises(NotImplementedError, match="norm"):
        from_timm(timm.create_model("convnext_atto_rms"))
    # the judge patch_timm uses: dilated stages, a tanh GELU, GRN with layer scale
    with pytest.raises(NotImplementedError, match="output_stride != 32"):
        from_timm(timm.create_model("convnext_atto", output_stride=16))
    with pytest.raises(NotImplementedError, match=r"stages\.0\.blocks\.0 .*exact \(erf\) GELU"):
        from_timm(timm.create_model("convnext_atto", act_layer="gelu_tanh"))
    with pytest.raises(NotImplementedError, match="GRN block with layer scale"):
        from_timm(timm.create_model("convnextv2_atto", ls_init_value=1.0))
    with pytest.raises(TypeError):
        from_timm(nn.Linear(2, 2))


def test_load_pretrained_into_existing_model(tmp_path, reference):
    t, sd, ref = reference("convnext_tiny")
    m = ConvNeXt(**dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), num_classes=10))
    assert load_pretrained(m, write(tmp_path, sd, "official", ".pth")) is m
    with torch.no_grad():
        assert max_rel_err(m.eval()(X), ref) <= 1e-4
