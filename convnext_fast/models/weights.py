"""Checkpoint loading: local files in three naming schemes, or timm's pretrained weights by name
(fetched and cached by timm / huggingface_hub), strict loading with clear errors.

Formats (detected from the keys, after unwrapping ``{'model': sd}``-style containers):

- ``timm``: our own names (``stem.0.weight``, ``stages.0.blocks.0.conv_dw.weight``, ``head.fc.*``).
- ``official``: facebookresearch ConvNeXt / ConvNeXt-V2 (``downsample_layers.*``,
  ``stages.i.j.{dwconv,norm,pwconv1,pwconv2,gamma,grn.gamma,grn.beta}``, ``norm.*``, ``head.*``).
- ``hf``: Hugging Face ``ConvNextForImageClassification`` / ``ConvNextV2ForImageClassification``
  (``convnext.`` / ``convnextv2.`` prefix, ``embeddings.*``, ``encoder.stages.i.*``, ``layernorm``,
  ``classifier``) and the bare ``ConvNextModel`` / ``ConvNextV2Model`` (no prefix, no classifier).

Tensors whose shapes differ from the model's only by size-1 dims are reshaped (Linear [D, C] vs
1x1 conv [D, C, 1, 1]; GRN [1, 1, 1, D] vs [D]). Files: ``.pth``/``.pt``/``.bin``/``.ckpt``
(``torch.load(weights_only=True)`` on CPU) and ``.safetensors``; a directory is searched for
``model.safetensors`` / ``pytorch_model.bin``.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import support
from .convnext import ConvNeXt, ConvNeXtFeatures

__all__ = [
    "CheckpointError", "read_checkpoint", "unwrap_state_dict", "detect_format", "convert_state_dict",
    "load_state_dict_strict", "load_pretrained", "timm_pretrained_cfg", "load_timm_pretrained", "from_timm",
]

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Dict[str, torch.Tensor]

_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module")
_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or its tensors do not match the model."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _resolve(path: PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in _DIR_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise CheckpointError(f"no checkpoint in directory {path!r} (looked for {', '.join(_DIR_FILES)})")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path!r} (pretrained= takes a local path, or True "
                              "for timm's weights of the model's name)")
    return path


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    if path.endswith((".pth", ".pt", ".bin", ".ckpt", ".tar")):
        return False
    with open(path, "rb") as f:  # sniff: torch files are zip ('PK') or pickle (0x80)
        head = f.read(9)
    return len(head) == 9 and head[:2] != b"PK" and head[0] != 0x80 and head[8:9] == b"{"


def read_checkpoint(path: PathLike) -> StateDict:
    """Load a local checkpoint file (or HF-style directory) to a flat ``{name: tensor}`` on CPU."""
    path = _resolve(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file
            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from e
    return unwrap_state_dict(obj, where=path)


def unwrap_state_dict(obj, where: str = "checkpoint") -> StateDict:
    """The state dict inside ``{'model': sd}`` / ``'state_dict'`` / ``'model_ema'`` wrappers, without
    a DistributedDataParallel ``module.`` prefix."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{where}: expected a state dict (a mapping of names to tensors), "
                              f"got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{where}: no tensors found (top-level keys: {list(obj)[:8]})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------
# Format detection and renaming
# --------------------------------------------------------------------------------------------

_HF_STEM = "embeddings.patch_embeddings.weight"


def _hf_prefix(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    for k in sd:
        if k.endswith(_HF_STEM):
            return k[: -len(_HF_STEM)]
    return None


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """'timm', 'timm_features', 'official' or 'hf' from the key names; CheckpointError if none fits."""
    if "stem.0.weight" in sd or "head.norm.weight" in sd or any(
            k.startswith("stages.") and ".blocks." in k for k in sd):
        return "timm"
    if "stem_0.weight" in sd or any(re.match(r"stages_\d+\.blocks\.", k) for k in sd):
        return "timm_features"
    if "downsample_layers.0.0.weight" in sd or any(k.startswith("downsample_layers.") for k in sd):
        return "official"
    if _hf_prefix(sd) is not None:
        return "hf"
    raise CheckpointError("unrecognised checkpoint format: expected timm ('stem.0.weight'), official "
                          "facebookresearch ('downsample_layers.0.0.weight') or Hugging Face "
                          f"('convnext.embeddings.patch_embeddings.weight') names; first keys: {list(sd)[:5]}")


_OFFICIAL_BLOCK = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2",
                   "gamma": "gamma", "grn.gamma": "mlp.grn.weight", "grn.beta": "mlp.grn.bias"}
_HF_BLOCK = {"dwconv": "conv_dw", "layernorm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2",
             "layer_scale_parameter": "gamma", "grn.weight": "mlp.grn.weight", "grn.bias": "mlp.grn.bias"}
_PARAM_RE = r"(?P<mod>.+)\.(?P<p>weight|bias)$"


def _block_key(i: str, j: str, rest: str, table: Mapping[str, str]) -> Optional[str]:
    if rest in table:  # a bare parameter (gamma / layer_scale_parameter)
        return f"stages.{i}.blocks.{j}.{table[rest]}"
    m = re.fullmatch(_PARAM_RE, rest)
    if m and m["mod"] in table:
        return f"stages.{i}.blocks.{j}.{table[m['mod']]}.{m['p']}"
    return None


# (pattern, timm name): a template for re.Match.expand, or a block's parameter table for _block_key
# (groups: stage, block, rest). The first pattern that matches the whole key decides.
_OFFICIAL_RULES = (
    (r"downsample_layers\.0\.(\d+)\.(.+)", r"stem.\1.\2"),
    (r"downsample_layers\.(\d+)\.(\d+)\.(.+)", r"stages.\1.downsample.\2.\3"),
    (r"stages\.(\d+)\.(\d+)\.(.+)", _OFFICIAL_BLOCK),
    (r"norm\.(.+)", r"head.norm.\1"),
    (r"head\.(?!fc\.|norm\.)(.+)", r"head.fc.\1"),
)
_HF_RULES = (  # matched against the key without the model prefix
    (r"embeddings\.patch_embeddings\.(.+)", r"stem.0.\1"),
    (r"embeddings\.layernorm\.(.+)", r"stem.1.\1"),
    (r"encoder\.stages\.(\d+)\.downsampling_layer\.(\d+)\.(.+)", r"stages.\1.downsample.\2.\3"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", _HF_BLOCK),
    (r"layernorm\.(.+)", r"head.norm.\1"),
)


def _renamed(k: str, rules) -> Optional[str]:
    """timm's name for ``k`` by the first rule matching it, None when none does (or a block
    parameter is not in the table)."""
    for pattern, to in rules:
        m = re.fullmatch(pattern, k)
        if m:
            return m.expand(to) if isinstance(to, str) else _block_key(m[1], m[2], m[3], to)
    return None


def _official_key(k: str) -> str:
    return _renamed(k, _OFFICIAL_RULES) or k


def _hf_key(k: str, prefix: str) -> str:
    if k.startswith("classifier."):
        return "head.fc." + k[len("classifier."):]
    if not k.startswith(prefix):
        return k
    return _renamed(k[len(prefix):], _HF_RULES) or k


def _squeezed(shape) -> Tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _timm_shapes(model: nn.Module) -> Dict[str, torch.Size]:
    """Parameter shapes of ``model`` under timm's full-model names."""
    sd = model.state_dict()
    if isinstance(model, ConvNeXtFeatures):
        out = {}
        for k, v in sd.items():
            k = re.sub(r"^stem_(\d+)\.", r"stem.\1.", k)
            k = re.sub(r"^stages_(\d+)\.", r"stages.\1.", k)
            out[k] = v.shape
        return out
    return {k: v.shape for k, v in sd.items()}


def convert_state_dict(sd: Mapping, model: Optional[nn.Module] = None) -> StateDict:
    """Any supported checkpoint (possibly wrapped) -> a state dict with timm's ConvNeXt names.

    With ``model``, tensors that differ from the model's shapes only by size-1 dims are reshaped
    to them (Linear vs 1x1 conv MLP weights, ``[1, 1, 1, D]`` GRN parameters). Without it, GRN
    parameters are flattened to ``[D]`` and other shapes are kept.
    """
    sd = unwrap_state_dict(sd)
    fmt = detect_format(sd)
    if fmt == "official":
        out = {_official_key(k): v for k, v in sd.items()}
    elif fmt == "hf":
        prefix = _hf_prefix(sd)
        out = {_hf_key(k, prefix): v for k, v in sd.items()}
    elif fmt == "timm_features":  # timm features_only=True (FeatureListNet) names
        out = {re.sub(r"^(stem|stages)_(\d+)\.", r"\1.\2.", k): v for k, v in sd.items()}
    else:
        out = dict(sd)
    shapes = _timm_shapes(model) if model is not None else {}
    for k, v in out.items():
        want = shapes.get(k)
        if want is not None:
            if v.shape != want and _squeezed(v.shape) == _squeezed(want) and v.numel() == want.numel():
                out[k] = v.reshape(want)
        elif ".mlp.grn." in k and v.dim() > 1:
            out[k] = v.reshape(-1)
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _more(items: List[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _to_model_names(sd: StateDict, model: nn.Module) -> StateDict:
    """timm full-model names -> ``model``'s names; drops what the model has no place for by design
    (the classifier of a ``num_classes=0`` model; head and later stages of a features model)."""
    if isinstance(model, ConvNeXtFeatures):
        out = {}
        n = model._num_stages
        for k, v in sd.items():
            m = re.match(r"^stem\.(\d+)\.(.+)", k)
            if m:
                out[f"stem_{m[1]}.{m[2]}"] = v
                continue
            m = re.match(r"^stages\.(\d+)\.(.+)", k)
            if m and int(m[1]) < n:
                out[f"stages_{m[1]}.{m[2]}"] = v
            elif m is None and not k.startswith(("head.", "norm_pre.")):
                out[k] = v  # unexpected: reported
        return out
    if isinstance(model, ConvNeXt) and isinstance(model.head.fc, nn.Identity):
        return {k: v for k, v in sd.items() if not k.startswith("head.fc.")}
    return dict(sd)


def _check_match(sd: StateDict, model: nn.Module, where: str) -> None:
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [k for k in target if k in sd and sd[k].shape != target[k].shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing key {missing[0]!r}{_more(missing)}")
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]!r}{_more(unexpected)}")
    if mismatched:
        k = mismatched[0]
        problems.append(f"shape mismatch for {k!r}: checkpoint {list(sd[k].shape)} vs model "
                        f"{list(target[k].shape)}{_more(mismatched)}")
        if "head.fc.weight" in mismatched and isinstance(model, ConvNeXt):
            n = sd["head.fc.weight"].shape[0]
            problems.append(f"the checkpoint has {n} classes, the model {model.num_classes}: "
                            f"build it with num_classes={n} (or num_classes=0)")
    raise CheckpointError(f"{where} does not match {type(model).__name__}: " + "; ".join(problems))


def load_state_dict_strict(model: nn.Module, sd: Mapping, where: str = "state dict") -> nn.Module:
    """Convert ``sd`` (any supported format) and load it into ``model`` with strict=True semantics;
    a mismatch raises :class:`CheckpointError` naming the first missing/unexpected/mis-shaped key."""
    sd = unwrap_state_dict(sd, where=where)
    fmt = detect_format(sd)
    converted = _to_model_names(convert_state_dict(sd, model), model)
    _check_match(converted, model, f"{where} ({fmt} format)")
    model.load_state_dict(converted, strict=True)
    return model


def load_pretrained(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a local checkpoint (timm, official or Hugging Face names; .pth/.pt/.bin/.safetensors)
    into ``model`` (a :class:`ConvNeXt` or :class:`ConvNeXtFeatures`) strictly. Returns ``model``.

    A ``num_classes=0`` model ignores the checkpoint's classifier; a features model ignores the head
    and the stages after its last output. Anything else that does not match raises
    :class:`CheckpointError`.
    """
    sd = read_checkpoint(path)
    return load_state_dict_strict(model, sd, where=f"checkpoint {os.fspath(path)!r}")


def timm_pretrained_cfg(name: str, overlay: Optional[Mapping] = None) -> dict:
    """timm's pretrained config for ``name`` (with ``overlay`` over it) as a dict; CheckpointError
    when timm is missing or has no weights for the name (found without building a model)."""
    try:
        from timm.models import get_pretrained_cfg
    except ImportError as e:
        raise CheckpointError(f"pretrained=True loads timm's weights for {name!r} and needs timm "
                              f"(pip install timm), which is not installed ({e}); or pass a local "
                              "checkpoint: pretrained='path/to/model.safetensors'") from e
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag
        raise CheckpointError(f"timm has no pretrained weights {name!r}: {e}") from e
    cfg = cfg.to_dict() if cfg is not None else {}
    cfg.update(overlay or {})
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") or cfg.get("state_dict")):
        import timm

        base = name.split(".", 1)[0]
        tags = timm.list_pretrained(f"{base}.*")
        raise CheckpointError(f"timm has no pretrained weights for {name!r}"
                              + (f"; with weights: {', '.join(tags)}" if tags else "")
                              + "; pass a local checkpoint as pretrained='path/to/model.safetensors'")
    return cfg


def load_timm_pretrained(model: ConvNeXt, name: str, cache_dir: Optional[PathLike] = None,
                         pretrained_cfg_overlay: Optional[Mapping] = None,
                         pretrained_cfg: Optional[Mapping] = None) -> ConvNeXt:
    """Load timm's pretrained weights for ``name`` (a timm model name, with or without a tag such
    as ``'convnext_tiny.fb_in22k'``) into ``model``. Returns ``model``.

    timm resolves the name and fetches the file through huggingface_hub (or its URL), whose
    cache (``HF_HUB_CACHE``, ``~/.cache/huggingface``) keeps it for later and for offline use
    (``HF_HUB_OFFLINE=1``). As in timm, a ``num_classes`` or ``in_chans`` other than the weights'
    leaves the classifier freshly initialised or adapts the stem. Without network or cache, the
    :class:`CheckpointError` says how to pass a local file instead. ``pretrained_cfg``: the
    config :func:`timm_pretrained_cfg` resolved for ``name``, when already at hand.
    """
    cfg = dict(pretrained_cfg) if pretrained_cfg is not None else timm_pretrained_cfg(name, pretrained_cfg_overlay)
    from timm.models import load_pretrained as timm_load_pretrained
    from timm.models.convnext import checkpoint_filter_fn

    where = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") or "the given state dict"
    try:
        timm_load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes,
                             in_chans=model.stem[0].in_channels, filter_fn=checkpoint_filter_fn,
                             cache_dir=cache_dir)
    except OSError as e:  # fetching: offline, not cached, refused (hub and URL errors are OSErrors)
        raise CheckpointError(
            f"cannot fetch timm's pretrained weights for {name!r} from {where} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without network, either "
            "fill the Hugging Face cache once where there is network (e.g. "
            f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`, then copy "
            "~/.cache/huggingface or point HF_HUB_CACHE at it; HF_HUB_OFFLINE=1 uses it as it is), "
            "or pass a local checkpoint (timm, official or Hugging Face format): "
            "pretrained='path/to/model.safetensors'") from e
    return model


# --------------------------------------------------------------------------------------------
# timm -> convnext_fast
# --------------------------------------------------------------------------------------------

def from_timm(timm_model: nn.Module) -> ConvNeXt:
    """A :class:`ConvNeXt` with ``timm_model``'s configuration and weights (same device, dtype,
    train/eval mode and requires_grad flags). Reads the configuration from the live modules;
    raises NotImplementedError for what :func:`~convnext_fast.models.support.timm_model_reason`
    finds unsupported."""
    for attr in ("stem", "stages", "head", "norm_pre"):
        if not hasattr(timm_model, attr):
            raise TypeError(f"from_timm expects a timm ConvNeXt (no {attr!r} attribute on "
                            f"{type(timm_model).__name__})")
    reason = support.timm_model_reason(timm_model)
    if reason:
        raise NotImplementedError(f"from_timm: {reason} is not supported by convnext_fast")
    stem, stages, head = timm_model.stem, timm_model.stages, timm_model.head

    depths, dims, kernel_sizes = [], [], []
    for i, stage in enumerate(stages):
        blocks = list(stage.blocks)
        depths.append(len(blocks))
        if blocks:
            dims.append(blocks[0].conv_dw.out_channels)
            kernel_sizes.append(blocks[0].conv_dw.kernel_size[0])
        else:
            dims.append(stage.downsample[1].out_channels if i > 0 else stem[0].out_channels)
            kernel_sizes.append(7)
    block0 = next(b for s in stages for b in s.blocks)

    dps = [b.drop_path.drop_prob for s in stages for b in s.blocks if type(b.drop_path).__name__ == "DropPath"]
    p = next(timm_model.parameters())
    num_classes = getattr(timm_model, "num_classes", 0)
    model = ConvNeXt(
        in_chans=stem[0].in_channels,
        num_classes=num_classes,
        global_pool=head.global_pool.pool_type,
        depths=tuple(depths),
        dims=tuple(dims),
        kernel_sizes=tuple(kernel_sizes),
        ls_init_value=1.0 if block0.gamma is not None else None,
        patch_size=stem[0].kernel_size[0],
        head_hidden_size=getattr(head, "hidden_size", None),
        conv_mlp=isinstance(block0.mlp.fc1, nn.Conv2d),
        conv_bias=stem[0].bias is not None,
        use_grn=hasattr(block0.mlp, "grn"),
        norm_eps=stem[1].eps,
        drop_rate=getattr(timm_model, "drop_rate", 0.0),
        drop_path_rate=max(dps) if dps else 0.0,
        device=p.device,
        dtype=p.dtype,
    )
    if isinstance(head.norm, nn.Identity):
        model.head.reset(num_classes, head.global_pool.pool_type, reset_other=True)
    # exact eps / drop probabilities of every module (they need not be uniform in timm)
    ours = dict(model.named_modules())
    for name, m in timm_model.named_modules():
        o = ours.get(name)
        if o is None:
            continue
        if hasattr(m, "eps") and hasattr(o, "eps"):
            o.eps = m.eps
        if hasattr(m, "drop_prob") and hasattr(o, "drop_prob"):
            o.drop_prob = m.drop_prob
    load_state_dict_strict(model, timm_model.state_dict(), where="timm model")
    for (_, po), (_, pt) in zip(model.named_parameters(), timm_model.named_parameters()):
        po.requires_grad_(pt.requires_grad)
    model.train(timm_model.training)
    return model
