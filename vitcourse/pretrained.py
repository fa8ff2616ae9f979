"""From a pretrained timm checkpoint to a fine-tuned :class:`~vitcourse.VisionTransformer`.

The pieces chapter 8 uses, each small enough to read in one sitting:

* :func:`load_timm` - a timm ViT with pretrained weights (from the Hugging Face hub or a
  local checkpoint file), or, when the weights cannot be had, the same architecture with
  seeded random weights and a sentence saying why;
* :func:`config_from_timm` - the :class:`~vitcourse.ViTConfig` of a timm ViT, read from the
  model rather than typed by hand, for :func:`vitcourse.timm_compat.from_timm`;
* :func:`resize_pos_embed` and :func:`adapt` - run a model at another image size (the position
  grid is resized bicubically) and/or with a new zero-initialised head;
* the probe / fine-tuning / from-scratch experiment that uses them is :mod:`vitcourse.transfer`;
* :func:`with_init`, :func:`init_from_timm` and :func:`init_statistics` - what ``vitcourse train
  --init timm:NAME`` does: a run's config with the checkpoint's architecture, its weights in the
  run's model, and the statistics the data is normalised with (passed to
  :func:`vitcourse.data.load_data` before the data is built).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .paths import downloads_allowed
from .vit import VisionTransformer, ViTConfig

__all__ = [
    "DEFAULT_CHECKPOINT",
    "TimmCheckpoint",
    "load_timm",
    "config_from_timm",
    "resize_pos_embed",
    "adapt",
    "INIT_PREFIX",
    "init_name",
    "with_init",
    "init_from_timm",
    "init_statistics",
]

DEFAULT_CHECKPOINT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
"""The ViT-Ti/16 checkpoint chapter 8 loads: ImageNet-21k pretraining, ImageNet-1k fine-tuning, 224 px."""


@dataclass
class TimmCheckpoint:
    """A timm model and where its weights came from.

    Attributes:
        model: the ``timm.models.vision_transformer.VisionTransformer``, in eval mode.
        pretrained: True when the checkpoint's weights were loaded, False for the random fallback.
        reason: why the fallback was used (one sentence), or ``None`` when ``pretrained``.
    """

    model: nn.Module
    pretrained: bool
    reason: str | None = None


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within ``timeout`` seconds.

    Asked first so that a machine without internet falls back in seconds instead of waiting
    for the hub client's retries. Behind an HTTPS proxy a direct connection says nothing, so
    then the answer is True and the hub client finds out.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_timm(name: str = DEFAULT_CHECKPOINT, file: str | os.PathLike | None = None, seed: int = 0,
              fallback: bool = True) -> TimmCheckpoint:
    """A timm model with the pretrained weights of ``name``, or the same architecture with random ones.

    With ``file``, the weights come from that local checkpoint (a ``.safetensors``, ``.pth`` or
    ``.npz`` file in a format timm loads), through
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=file))``; nothing
    is downloaded. Without it they come from the Hugging Face hub (or its local cache), unless
    ``VITCOURSE_OFFLINE`` is set or the hub cannot be reached (then even weights in the hub's
    local cache are not used, so an offline build does not depend on what a machine has cached).

    Args:
        name: a timm model name with its pretrained tag, e.g. :data:`DEFAULT_CHECKPOINT`.
        file: an optional local checkpoint file.
        seed: seeds ``torch`` before a fallback model is built, so its random weights are reproducible.
        fallback: when False, a failed load raises instead of falling back.

    Returns:
        A :class:`TimmCheckpoint`; its model is in eval mode and keeps timm's ``pretrained_cfg``
        (input size, mean/std, interpolation, crop) either way.

    Raises:
        RuntimeError: if the weights cannot be loaded and ``fallback`` is False.
    """
    import timm

    reason = None
    if file is None and not downloads_allowed():
        reason = "VITCOURSE_OFFLINE is set, so no weights are downloaded"
    elif file is None and not _hub_reachable():
        reason = "the Hugging Face hub cannot be reached from this machine"
    else:
        # a local file: timm's own .npz reader for the original (big_vision) ViT weights, else its state-dict reader
        overlay = {} if file is None else {"pretrained_cfg_overlay": dict(file=str(file), custom_load=_is_npz(file))}
        try:
            model = timm.create_model(name, pretrained=True, **overlay)
            return TimmCheckpoint(model.eval(), pretrained=True)
        except Exception as err:  # noqa: BLE001 - any failure to get weights leads to the same fallback
            detail = " ".join(str(err).split())[:160]
            reason = f"loading the weights failed ({type(err).__name__}{': ' + detail if detail else ''})"
    if not fallback:
        raise RuntimeError(f"no pretrained weights for {name}: {reason}.")
    torch.manual_seed(seed)
    return TimmCheckpoint(timm.create_model(name, pretrained=False).eval(), pretrained=False, reason=reason)


def _is_npz(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a NumPy ``.npz`` archive (a zip of ``.npy`` arrays), judged by its content:
    a PyTorch ``.pth`` is a zip file too, but of pickles."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def config_from_timm(timm_model: nn.Module) -> ViTConfig:
    """The :class:`ViTConfig` of a timm ViT, read from its modules (dropout and drop path 0).

    :func:`vitcourse.timm_compat.from_timm` still checks every other setting and refuses a
    model that ``VisionTransformer(config)`` would not reproduce.
    """
    pe = timm_model.patch_embed
    height, width = pe.img_size
    if height != width or pe.patch_size[0] != pe.patch_size[1]:
        raise ValueError(f"vitcourse builds square models; this timm model has images {pe.img_size} "
                         f"and patches {pe.patch_size}.")
    blocks = list(timm_model.blocks)
    return ViTConfig(
        image_size=height,
        patch_size=pe.patch_size[0],
        in_channels=pe.proj.in_channels,
        num_classes=timm_model.num_classes,
        dim=timm_model.embed_dim,
        depth=len(blocks),
        heads=blocks[0].attn.num_heads,
        mlp_dim=blocks[0].mlp.fc1.out_features,
    )


def _pair(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def resize_pos_embed(pos_embed: Tensor, old_grid: int | tuple[int, int], new_grid: int | tuple[int, int],
                     mode: str = "bicubic", antialias: bool = True) -> Tensor:
    """Resize a learned position grid for another number of patches, keeping the CLS position.

    The ``N = gh * gw`` patch positions are laid out as a ``D``-channel image of ``gh x gw``
    pixels, interpolated to the new grid and flattened again in reading order; the CLS
    position (index 0) has no place in the grid and is kept as it is. With the defaults this
    computes what ``timm.layers.resample_abs_pos_embed`` does.

    Args:
        pos_embed: ``(1, 1 + N, D)``, the CLS position first.
        old_grid: the grid of ``pos_embed``, ``g`` or ``(gh, gw)`` with ``gh * gw = N``.
        new_grid: the grid wanted, ``g'`` or ``(gh', gw')``.
        mode: ``F.interpolate`` mode; bicubic, as the ViT paper's fine-tuning at higher resolution.
        antialias: passed to ``F.interpolate`` (bicubic with antialias uses PIL's kernel).

    Returns:
        ``(1, 1 + N', D)`` with ``N' = gh' * gw'``, in the dtype of ``pos_embed``; at the same
        grid, ``pos_embed`` itself.
    """
    old, new = _pair(old_grid), _pair(new_grid)
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != 1 + old[0] * old[1]:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} is not (1, 1 + {old[0]}*{old[1]}, D).")
    if old == new:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, D), (1, N, D)
    d = grid.shape[-1]
    image = grid.float().reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    image = F.interpolate(image, size=new, mode=mode, antialias=antialias)  # (1, D, gh', gw')
    grid = image.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d).to(pos_embed.dtype)  # (1, N', D)
    return torch.cat([cls_pos, grid], dim=1)


def adapt(model: VisionTransformer, image_size: int | None = None, num_classes: int | None = None
          ) -> VisionTransformer:
    """A copy of ``model`` for another image size and/or another set of classes.

    Every weight is copied. For a new ``image_size`` the position grid is resized with
    :func:`resize_pos_embed` (the patch size stays, so the grid becomes ``image_size / patch_size``
    on a side). For a new ``num_classes`` the head is replaced by a zero-initialised
    ``(num_classes, D)`` linear layer, as the ViT paper does for fine-tuning, so every class
    starts with the same score.

    Returns:
        A new :class:`VisionTransformer` in the training mode of ``model``; ``model`` is unchanged.
    """
    c = model.config
    config = replace(c, image_size=image_size or c.image_size, num_classes=num_classes or c.num_classes)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    old_side, new_side = c.image_size // c.patch_size, config.image_size // config.patch_size
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], old_side, new_side)
    if config.num_classes != c.num_classes:
        state["head.weight"] = torch.zeros(config.num_classes, config.dim)
        state["head.bias"] = torch.zeros(config.num_classes)
    new = VisionTransformer(config)
    new.load_state_dict(state, strict=True)
    return new.train(model.training)


INIT_PREFIX = "timm:"
"""How ``--init`` names a timm checkpoint: ``timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k``."""


def init_name(init: str) -> str:
    """The timm model name in an ``--init`` value ``"timm:NAME"``; :class:`ValueError` (one sentence) otherwise.

    The name must be one timm knows (with or without its pretrained tag after a dot); nothing
    is downloaded to check it.
    """
    import timm

    if not isinstance(init, str) or not init.startswith(INIT_PREFIX) or not init[len(INIT_PREFIX):].strip():
        raise ValueError(f"--init {init!r} is not of the form timm:NAME; pass e.g. --init timm:{DEFAULT_CHECKPOINT}.")
    name = init[len(INIT_PREFIX):].strip()
    if not timm.is_model(name):
        raise ValueError(f"--init {init}: timm has no model named {name!r}; pass a timm ViT such as "
                         f"timm:{DEFAULT_CHECKPOINT} (timm.list_models('vit_*') lists them).")
    architecture, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(f"{architecture}.*"):  # timm.is_model ignores the tag
        known = [n.partition(".")[2] for n in timm.list_pretrained(f"{architecture}.*")]
        raise ValueError(f"--init {init}: timm has no weights tagged {tag!r} for {architecture}; pass one of its tags "
                         f"({', '.join(known[:6]) or 'none'}{', ...' if len(known) > 6 else ''}) or the name alone.")
    return name


def _architecture(name: str) -> ViTConfig:
    """The :class:`ViTConfig` of timm model ``name`` (its own image size and classes).

    Built with random weights (nothing is downloaded). :class:`ValueError` if vitcourse cannot
    reproduce the model (see :func:`vitcourse.timm_compat.check_timm_model`).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from .timm_compat import check_timm_model

    with torch.random.fork_rng(devices=[]):  # building the model draws random weights: leave the caller's state
        model = timm.create_model(name, pretrained=False)
    if type(model) is not TimmViT:
        raise ValueError(f"--init timm:{name} is a {type(model).__name__}, not a ViT the course builds; pass a "
                         f"timm ViT such as timm:{DEFAULT_CHECKPOINT}.")
    try:
        config = config_from_timm(model)
        check_timm_model(model, config)
    except ValueError as err:
        raise ValueError(f"--init timm:{name} cannot be rebuilt by vitcourse: {str(err).rstrip('.')}.") from None
    return config


def with_init(cfg, init: str, file: str | os.PathLike | None = None, image_size: int | None = None):
    """``cfg`` (a :class:`vitcourse.config.TrainConfig`) set up to start from the timm checkpoint ``init``.

    The model becomes the checkpoint's architecture (``cfg.vit`` is replaced by the ViT read off
    the timm model, dropout and drop path 0) at the run's own image size (``image_size`` if
    given, else ``cfg.image_size``), not the checkpoint's: the patch size stays and the learned
    position grid is resized bicubically when the run starts (:func:`init_from_timm`). ``file``
    is an optional local checkpoint file in a format timm loads, used instead of a download.

    Raises:
        ValueError: ``init`` is malformed or unknown to timm, timm's model is not a ViT vitcourse
            reproduces, or ``cfg.image_size`` is not a multiple of the checkpoint's patch size.
    """
    if init.startswith(MAE_PREFIX):
        return _with_mae_init(cfg, init, file, image_size)
    name = init_name(init)
    config = _architecture(name)
    size = cfg.image_size if image_size is None else image_size
    if size % config.patch_size:
        raise ValueError(f"--init timm:{name} has {config.patch_size}-pixel patches, which do not tile "
                         f"{size}-pixel images; pass --image-size with a multiple of {config.patch_size}.")
    vit = replace(config, image_size=size, num_classes=cfg.vit.num_classes)
    return cfg.replace(model="vit", image_size=size, vit=vit, init=f"{INIT_PREFIX}{name}",
                       init_file=None if file is None else str(file))


def init_from_timm(model: VisionTransformer, cfg) -> str:
    """Copy the pretrained weights named by ``cfg.init`` (from ``cfg.init_file`` if set) into ``model``.

    The checkpoint is loaded with :func:`load_timm` (no random fallback), converted with
    :func:`vitcourse.timm_compat.from_timm` and :func:`adapt` ed to ``model``'s image size (bicubic
    position grid) and number of classes (a new zero-initialised head). Every other weight is the
    checkpoint's, bit for bit.

    Returns:
        One line for the run's log saying what was loaded.

    Raises:
        ValueError: the weights cannot be had (offline, hub unreachable, unreadable file) or do not
            fit ``model`` (then ``cfg`` was not made by :func:`with_init`); one sentence.
    """
    from .timm_compat import from_timm

    name = init_name(cfg.init)
    try:
        checkpoint = load_timm(name, file=cfg.init_file, fallback=False)
    except RuntimeError as err:
        advice = (f"check that {cfg.init_file} is a checkpoint file of {name}" if cfg.init_file else
                  "connect to the internet, or pass a local checkpoint file with --init-file PATH")
        raise ValueError(f"{str(err).rstrip('.')}; {advice}.") from None
    pretrained_model = from_timm(checkpoint.model, config_from_timm(checkpoint.model))
    adapted = adapt(pretrained_model, image_size=model.config.image_size, num_classes=model.config.num_classes)
    ours, theirs = model.config, adapted.config
    if replace(ours, dropout=0.0, drop_path=0.0) != theirs:
        raise ValueError(f"the run's ViT ({ours.dim} wide, {ours.depth} blocks, {ours.heads} heads, patch "
                         f"{ours.patch_size}) is not the architecture of {cfg.init}; build the run's config with "
                         f"vitcourse.pretrained.with_init.")
    model.load_state_dict(adapted.state_dict(), strict=True)
    source = cfg.init_file or "the Hugging Face hub"
    old_side = pretrained_model.config.image_size // ours.patch_size
    return (f"init: {cfg.init} from {source}; position grid {old_side}x{old_side} -> "
            f"{ours.image_size // ours.patch_size}x{ours.image_size // ours.patch_size} (bicubic), "
            f"new zero head with {ours.num_classes} classes")


def init_statistics(init: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` the checkpoint ``init`` (``"timm:NAME"`` or ``"mae:PATH"``) was trained with.

    For timm, read from its ``pretrained_cfg`` for the name (its default tag if the name has none);
    nothing is downloaded. For an MAE run of the course, from its checkpoint.
    """
    if init.startswith(MAE_PREFIX):
        from .checkpoint import load_checkpoint

        info = load_checkpoint(_mae_file(init))
        return tuple(float(v) for v in info["mean"]), tuple(float(v) for v in info["std"])
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(init_name(init))
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


MAE_PREFIX = "mae:"
"""How ``--init`` names a masked-autoencoder run of the course: ``mae:runs/mae`` (its best checkpoint) or a file."""


def _mae_file(init: str) -> Path:
    from .checkpoint import BEST_FILE

    path = Path(init[len(MAE_PREFIX):]).expanduser()
    return path / BEST_FILE if path.is_dir() else path


def _with_mae_init(cfg, init: str, file, image_size: int | None):
    """``cfg`` set up to start from the encoder of the MAE run ``init`` (``"mae:PATH"``): its ViT, at its size."""
    from .checkpoint import load_checkpoint
    from .config import TrainConfig

    if file is not None:
        raise ValueError("--init-file is for timm checkpoints; an MAE run is named by its path: --init mae:PATH.")
    path = _mae_file(init)
    info = load_checkpoint(path)  # checked: nothing in it runs, its settings fit its weights
    mae = TrainConfig.from_dict(info["config"])
    if mae.objective != "mae":
        raise ValueError(f"--init {init}: {path} is not a masked-autoencoder run (its objective is {mae.objective!r}); "
                         f"pass a run of vitcourse train --objective mae.")
    size = cfg.image_size if image_size is None else image_size
    if size != mae.image_size:
        raise ValueError(f"--init {init} was pretrained on {mae.image_size}-pixel images and its positions are fixed "
                         f"to that grid; train at --image-size {mae.image_size}.")
    vit = replace(mae.vit, num_classes=cfg.vit.num_classes, distilled=cfg.vit.distilled)
    return cfg.replace(model="vit", image_size=size, vit=vit, init=f"{MAE_PREFIX}{path}", init_file=None)


def init_weights(model: VisionTransformer, cfg) -> str:
    """Start ``model`` from what ``cfg.init`` names (:func:`init_from_timm`, or an MAE run's encoder);
    returns one line for the run's log."""
    if not cfg.init.startswith(MAE_PREFIX):
        return init_from_timm(model, cfg)
    from .checkpoint import load_model

    if model.config.distilled:
        raise ValueError(f"the encoder of {cfg.init} has no position for a distillation token; fine-tune it without "
                         f"--distill-from, or distil a ViT trained from scratch.")
    mae, _, info = load_model(_mae_file(cfg.init))
    encoder = mae.encoder_state_dict()
    state = model.state_dict()
    if any(k not in state or state[k].shape != v.shape for k, v in encoder.items()):
        raise ValueError(f"the encoder of {cfg.init} does not fit the run's ViT; build the run's config with "
                         f"vitcourse.pretrained.with_init.")
    model.load_state_dict({**state, **encoder})
    return f"init: the encoder of {cfg.init} (epoch {info.get('epoch')}); new head with {model.config.num_classes} classes"
