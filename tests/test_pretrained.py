"""pretrained=True: timm's weights by name, through timm and huggingface_hub's own cache and loader.

There is no network here, so the test makes the cache itself: a Hugging Face hub cache folder
(HF_HUB_CACHE) holding, under the repo id that timm's pretrained config names, the safetensors of
a randomly initialised timm model; with HF_HUB_OFFLINE=1 the hub reads it as it would a download.
huggingface_hub reads those variables at import, hence the child process.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import convnext_fast

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

CHECK = r"""
import json, sys, torch
from safetensors.torch import load_file
import convnext_fast
from convnext_fast import CheckpointError, create_model

saved = load_file(sys.argv[1])
out = {}

def same(model, skip=()):
    sd = model.state_dict()
    return all(torch.equal(sd[k], saved[k]) for k in sd if not k.startswith(skip)) and len(sd) > 0

out["tiny_by_function"] = same(convnext_fast.convnext_atto(pretrained=True)) and len(
    convnext_fast.convnext_atto().state_dict()) == len(saved)
out["by_tag"] = same(create_model("convnext_atto.d2_in1k", pretrained=True))
m = create_model("convnext_atto", pretrained=True, num_classes=10)
out["new_head"] = [list(m.head.fc.weight.shape), same(m, skip=("head.fc.",)),
                   torch.equal(m.head.fc.weight, saved["head.fc.weight"][:10])]
f = create_model("convnext_atto", pretrained=True, features_only=True)
out["features"] = [type(f).__name__, torch.equal(f.state_dict()["stem_0.weight"], saved["stem.0.weight"])]
errors = {}
for name in ("convnext_tiny", "convnext_tiny.no_such_tag", "convnextv2_small"):
    try:
        create_model(name, pretrained=True)
        errors[name] = None
    except CheckpointError as e:
        errors[name] = str(e)
out["errors"] = errors
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """An HF hub cache holding a random convnext_atto under timm's repo id; the weights' path."""
    from timm.models import get_pretrained_cfg

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)
    model = timm.create_model("convnext_atto", pretrained=False)
    repo = get_pretrained_cfg("convnext_atto").hf_hub_id  # e.g. timm/convnext_atto.d2_in1k
    assert repo and get_pretrained_cfg("convnext_atto.d2_in1k").hf_hub_id == repo
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    weights = snapshot / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return root, weights


def test_pretrained_true_loads_timms_weights_from_the_hub_cache(hub_cache):
    root, weights = hub_cache
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(root), HF_HUB_CACHE=str(root / "hub"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHECK, str(weights)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["tiny_by_function"] and got["by_tag"]
    assert got["new_head"] == [[10, 320], True, False]  # timm's rule: another num_classes, a new head
    assert got["features"] == ["ConvNeXtFeatures", True]

    offline = got["errors"]["convnext_tiny"]  # not in the cache, and no network
    assert "cannot fetch timm's pretrained weights for 'convnext_tiny'" in offline
    assert "pretrained='path/to/model.safetensors'" in offline and "HF_HUB_CACHE" in offline
    assert "no_such_tag" in got["errors"]["convnext_tiny.no_such_tag"]
    assert "timm has no pretrained weights for 'convnextv2_small'" in got["errors"]["convnextv2_small"]


def test_pretrained_path_and_checkpoint_path_still_load_local_files(tmp_path):
    torch.manual_seed(2)
    reference = timm.create_model("convnext_atto", pretrained=False)
    path = tmp_path / "atto.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    for model in (convnext_fast.convnext_atto(pretrained=str(path)),
                  convnext_fast.create_model("convnext_atto", checkpoint_path=path)):
        sd = model.state_dict()
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in sd.items())


def test_pretrained_rejects_other_values():
    with pytest.raises(ValueError, match="True .*local checkpoint path"):
        convnext_fast.convnext_atto(pretrained=1)
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        convnext_fast.create_model("convnext_atto", pretrained_cfg={"file": "x"})
