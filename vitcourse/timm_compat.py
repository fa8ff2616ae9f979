"""Exchange weights with timm, the field's reference ViT implementation.

``vitcourse.VisionTransformer`` uses timm's parameter names and shapes, so the
conversion is a plain ``load_state_dict(strict=True)`` in either direction;
this module builds the matching timm model and does the loading.

Equal names and shapes are not enough for equal logits: a timm ViT built with
another activation, LayerNorm epsilon, pooling or a dozen other options has the
same ``state_dict`` but computes something else. :func:`check_timm_model`
compares every such setting with what :class:`VisionTransformer` computes and
refuses the first one it does not reproduce, so :func:`from_timm` either gives
the timm model's logits or raises.

A course model with ``ViTConfig(distilled=True)`` exchanges weights the same
way with timm's DeiT ``VisionTransformerDistilled`` (``deit_tiny_distilled_patch16_224``
and its siblings, or any size built directly): the same checks, plus the
distillation token and its head. timm's ``distilled_training`` flag (whether
training mode returns both heads' logits or their average) is carried across
in both directions, so the two models compute the same thing in either mode.
A distilled model and a plain one are never exchanged for each other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import SimpleNamespace

from torch import nn

from .encoder import LAYER_NORM_EPS
from .vit import VisionTransformer, ViTConfig, require_plain_vit

__all__ = ["timm_vit", "to_timm", "from_timm", "check_timm_model"]

_LAYER_NORM = f"LayerNorm(eps={LAYER_NORM_EPS:g}) with weight and bias"
"""How the refusals name the only normalisation vitcourse computes."""


def _timm() -> SimpleNamespace:
    """The timm classes a reproducible ViT is made of, or an ImportError saying how to install timm."""
    try:
        from timm.layers import GELU
        from timm.models import deit
        from timm.models import vision_transformer as tv
    except ImportError as err:  # pragma: no cover - timm is in requirements.txt
        raise ImportError("timm is not installed; run `pip install timm` to exchange weights with it.") from err
    return SimpleNamespace(VisionTransformer=tv.VisionTransformer, Distilled=deit.VisionTransformerDistilled,
                           Block=tv.Block, Attention=tv.Attention,
                           Mlp=tv.Mlp, PatchEmbed=tv.PatchEmbed, DropPath=tv.DropPath,
                           LayerNorms=(nn.LayerNorm, tv.LayerNorm), GELU=GELU)


def timm_vit(config: ViTConfig) -> nn.Module:
    """A ``timm.models.vision_transformer.VisionTransformer`` with the architecture of ``config``.

    With ``config.distilled`` it is timm's ``timm.models.deit.VisionTransformerDistilled``
    instead, left at timm's ``distilled_training=False`` (:func:`to_timm` copies a model's flag).

    timm computes the MLP width as ``int(dim * mlp_ratio)``; the ratio passed
    here is nudged by half a unit so that this gives exactly ``mlp_dim`` even
    when ``mlp_dim / dim`` has no exact binary representation. Dropout goes
    where vitcourse has it: after the positional embedding, the attention
    projection and both MLP layers, and not before the head.

    Raises:
        ValueError: if the installed timm builds something :func:`check_timm_model` refuses,
            or ``config`` uses a small-data option (``stem`` other than ``"patch"``, ``lsa``).
    """
    require_plain_vit(config, "timm", distilled_ok=True)  # timm has no SPT, conv stem or LSA
    c = config
    timm = _timm()
    model = (timm.Distilled if c.distilled else timm.VisionTransformer)(
        img_size=c.image_size,
        patch_size=c.patch_size,
        in_chans=c.in_channels,
        num_classes=c.num_classes,
        embed_dim=c.dim,
        depth=c.depth,
        num_heads=c.heads,
        mlp_ratio=(c.mlp_dim + 0.5) / c.dim,
        qkv_bias=True,
        drop_rate=0.0,
        pos_drop_rate=c.dropout,
        proj_drop_rate=c.dropout,
        drop_path_rate=c.drop_path,
    )
    hidden = model.blocks[0].mlp.fc1.out_features if c.depth else c.mlp_dim
    if hidden != c.mlp_dim:  # a ValueError, not an assert: `python -O` must not skip this check
        raise ValueError(f"timm built an MLP of width {hidden} for mlp_dim={c.mlp_dim}; "
                         f"this timm version rounds mlp_ratio differently, so pass a config timm can build.")
    check_timm_model(model, config)  # a timm version with other defaults fails here, not in a comparison
    return model


def to_timm(model: VisionTransformer) -> nn.Module:
    """A timm ViT holding a copy of ``model``'s weights (loaded with ``strict=True``).

    A distilled ``model`` gives a ``VisionTransformerDistilled`` with ``model``'s ``distilled_training``.
    """
    reference = timm_vit(model.config)
    reference.load_state_dict(model.state_dict(), strict=True)
    if model.config.distilled:
        reference.set_distilled_training(model.distilled_training)
    return reference.train(model.training)


def from_timm(timm_model: nn.Module, config: ViTConfig) -> VisionTransformer:
    """A :class:`VisionTransformer` holding a copy of a timm ViT's weights (``strict=True``).

    A ``VisionTransformerDistilled`` needs ``config.distilled``; its ``distilled_training`` is copied.

    Raises:
        ValueError: if the timm model computes anything ``VisionTransformer(config)`` does not
            (see :func:`check_timm_model`), naming the first mismatch.
    """
    require_plain_vit(config, "timm", distilled_ok=True)  # timm has no SPT, conv stem or LSA
    model = VisionTransformer(config)
    _refuse_first(_mismatches(timm_model, model))
    model.load_state_dict(timm_model.state_dict(), strict=True)
    if config.distilled:
        model.set_distilled_training(timm_model.distilled_training)
    return model.train(timm_model.training)


def check_timm_model(timm_model: nn.Module, config: ViTConfig) -> None:
    """Refuse a timm ViT whose logits or training ``VisionTransformer(config)`` would not reproduce.

    Compared, in the order the data flows: the model class (``VisionTransformerDistilled``
    exactly when ``config.distilled``); class token,
    register tokens, pooling and positional-embedding layout; the patch
    embedding (bias, norm, dynamic size or padding), pre-norm and patch
    dropout; in every block the block, attention and MLP classes, qkv, proj and
    MLP biases, qk-norm and the other extra norms, layer scale, the activation
    (exact GELU only) and both LayerNorms (type and eps); the final norm,
    fc_norm, head dropout and the head(s). Then the weights' names and shapes, and last the
    settings the config sets but the weights do not show: heads, dropout rates
    and drop-path rates.

    Raises:
        ValueError: one sentence naming the first mismatch and how to build a timm model without it.
    """
    require_plain_vit(config, "timm", distilled_ok=True)  # timm has no SPT, conv stem or LSA
    _refuse_first(_mismatches(timm_model, VisionTransformer(config)))


def _refuse_first(problems: Iterator[str]) -> None:
    """Raise a ValueError with the first of ``problems``, if there is one."""
    for problem in problems:
        raise ValueError(problem)


def _refusal(found: str, ours: str, fix: str) -> str:
    """The one sentence every refusal uses: what timm has, what vitcourse does, what to build."""
    return f"the timm model {found}; vitcourse reproduces only {ours}: build it with {fix}."


def _mismatches(timm_model: nn.Module, ours: VisionTransformer) -> Iterator[str]:
    """Sentences naming each difference between ``timm_model`` and ``ours``, in the order checked."""
    tv = _timm()
    distilled = ours.config.distilled
    if type(timm_model) is tv.Distilled and not distilled:
        yield ("the timm model is a VisionTransformerDistilled, with a distillation token and a second head, but the "
               "ViTConfig has distilled=False; pass distilled=True in the ViTConfig.")
        return
    if type(timm_model) is tv.VisionTransformer and distilled:
        yield ("the timm model is a plain VisionTransformer without a distillation token, but the ViTConfig has "
               "distilled=True; pass distilled=False in the ViTConfig or build the timm model with timm_vit(config).")
        return
    if type(timm_model) is not (tv.Distilled if distilled else tv.VisionTransformer):
        expected = "deit.VisionTransformerDistilled" if distilled else "vision_transformer.VisionTransformer"
        yield (f"vitcourse.timm_compat needs a timm.models.{expected}, got "
               f"{type(timm_model).__qualname__}; build the timm model with vitcourse.timm_compat.timm_vit(config).")
        return
    yield from _layout_mismatches(timm_model, tv)
    yield from _weight_mismatches(timm_model, ours)
    yield from _config_mismatches(timm_model, ours)


def _layout_mismatches(m: nn.Module, tv: SimpleNamespace) -> Iterator[str]:
    """Settings vitcourse never computes, whatever the config."""
    if m.cls_token is None:
        yield _refusal("has no class token (class_token=False)", "a class token", "class_token=True")
    if m.reg_token is not None:
        yield _refusal(f"has {m.num_reg_tokens} register tokens (reg_tokens)", "models without register tokens",
                       "reg_tokens=0")
    if m.global_pool != "token" or m.attn_pool is not None:
        yield _refusal(f"pools with global_pool={m.global_pool!r}", "the class token's features (global_pool='token')",
                       "global_pool='token'")
    if m.pos_embed is None:
        yield _refusal("has no positional embedding (pos_embed='none')", "a learned positional embedding",
                       "pos_embed='learn'")
    if m.no_embed_class:
        yield _refusal("adds positions to the patches only (no_embed_class=True)",
                       "one position for the class token and one per patch", "no_embed_class=False")
    if m.dynamic_img_size:
        yield _refusal("resamples positions for other image sizes (dynamic_img_size=True)",
                       "one fixed image size", "dynamic_img_size=False")
    if not isinstance(m.norm_pre, nn.Identity):
        yield _refusal("normalises the tokens before the first block (pre_norm=True)",
                       "models without a norm before the blocks (norm_pre)", "pre_norm=False")
    yield from _patch_embed_mismatches(m.patch_embed, tv)
    if not isinstance(m.patch_drop, nn.Identity):
        yield _refusal("drops patches while training (patch_drop_rate > 0)", "models without patch dropout",
                       "patch_drop_rate=0")
    for i, block in enumerate(m.blocks):
        yield from _block_mismatches(f"blocks.{i}", block, tv)
    if not isinstance(m.fc_norm, nn.Identity):
        yield _refusal("normalises after pooling (fc_norm)", "a final norm before pooling", "fc_norm=False")
    if isinstance(m.norm, nn.Identity):
        yield _refusal("has no final norm (final_norm=False)", f"a final {_LAYER_NORM}", "final_norm=True")
    yield from _norm_mismatches("norm", m.norm, tv)
    if m.head_drop.p:
        yield _refusal(f"drops {m.head_drop.p:g} of the features before the head (drop_rate)",
                       "a head without dropout", "drop_rate=0")
    if not isinstance(m.head, nn.Linear):
        yield _refusal("has no classification head (num_classes=0)", "a linear head", "num_classes > 0")
    elif m.head.bias is None:
        yield _refusal("has a head without bias", "a linear head with bias", "the default head")
    head_dist = getattr(m, "head_dist", None)
    if head_dist is not None and (not isinstance(head_dist, nn.Linear) or head_dist.bias is None):
        yield _refusal("has no linear distillation head with bias (head_dist)", "a linear head_dist with bias",
                       "num_classes > 0 and the default head")


def _patch_embed_mismatches(pe: nn.Module, tv: SimpleNamespace) -> Iterator[str]:
    """The patch embedding must be one strided convolution with bias, flattened, nothing else."""
    if type(pe) is not tv.PatchEmbed:
        yield _refusal(f"embeds patches with {type(pe).__qualname__}", "timm's PatchEmbed",
                       "the default embed_layer")
        return
    if pe.proj.bias is None:
        yield _refusal("embeds patches without a bias", "a patch embedding with bias", "pre_norm=False")
    if not isinstance(pe.norm, nn.Identity):
        yield _refusal(f"normalises the patch embedding with {type(pe.norm).__name__} (embed_norm_layer)",
                       "a patch embedding without norm", "embed_norm_layer=None")
    if pe.dynamic_img_pad or not pe.strict_img_size or not pe.flatten:
        yield _refusal("accepts other image sizes in its patch embedding (dynamic_img_size or dynamic_img_pad)",
                       "one fixed image size", "dynamic_img_size=False and dynamic_img_pad=False")


def _block_mismatches(name: str, block: nn.Module, tv: SimpleNamespace) -> Iterator[str]:
    """One encoder block: pre-norm attention and a GELU MLP, each with bias, and nothing in between."""
    if type(block) is not tv.Block:
        yield _refusal(f"uses {type(block).__qualname__} as {name}", "timm's pre-norm Block", "block_fn=Block")
        return
    yield from _norm_mismatches(f"{name}.norm1", block.norm1, tv)
    attn = block.attn
    if type(attn) is not tv.Attention:
        yield _refusal(f"uses {type(attn).__qualname__} as {name}.attn", "timm's Attention", "attn_layer='attn'")
        return
    if attn.qkv.bias is None:
        yield _refusal(f"has no bias in {name}.attn.qkv (qkv_bias=False)", "a qkv projection with bias",
                       "qkv_bias=True")
    if attn.proj.bias is None:
        yield _refusal(f"has no bias in {name}.attn.proj (proj_bias=False)", "projections with bias",
                       "proj_bias=True")
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        yield _refusal(f"normalises queries and keys in {name}.attn (qk_norm=True)", "attention without qk-norm",
                       "qk_norm=False")
    if not isinstance(attn.norm, nn.Identity):
        yield _refusal(f"normalises the attention output in {name}.attn (scale_attn_norm=True)",
                       "attention without an output norm", "scale_attn_norm=False")
    if getattr(attn, "gate", None) is not None:
        yield _refusal(f"gates the attention output in {name}.attn", "ungated attention", "timm's default Attention")
    if not math.isclose(attn.scale, attn.head_dim**-0.5):
        yield _refusal(f"scales attention scores by {attn.scale:g} in {name}.attn",
                       "scores scaled by 1/sqrt(head_dim)", "timm's default Attention")
    if attn.attn_drop.p:
        yield _refusal(f"drops {attn.attn_drop.p:g} of the attention weights in {name}.attn (attn_drop_rate)",
                       "attention without weight dropout", "attn_drop_rate=0")
    for ls in ("ls1", "ls2"):
        if not isinstance(getattr(block, ls), nn.Identity):
            yield _refusal(f"uses layer scale in {name}.{ls} (init_values)", "blocks without layer scale",
                           "init_values=None")
    for dp in ("drop_path1", "drop_path2"):
        module = getattr(block, dp)
        if not isinstance(module, nn.Identity) and not (type(module) is tv.DropPath and module.scale_by_keep):
            yield _refusal(f"uses {module!r} as {name}.{dp}", "drop path that rescales kept samples",
                           "drop_path_rate and timm's DropPath")
    yield from _norm_mismatches(f"{name}.norm2", block.norm2, tv)
    yield from _mlp_mismatches(f"{name}.mlp", block.mlp, tv)


def _mlp_mismatches(name: str, mlp: nn.Module, tv: SimpleNamespace) -> Iterator[str]:
    """fc1 -> exact GELU -> fc2, both with bias, and no norm inside."""
    if type(mlp) is not tv.Mlp:
        yield _refusal(f"uses {type(mlp).__qualname__} as {name}", "timm's Mlp", "mlp_layer=Mlp")
        return
    act = mlp.act
    exact = type(act) is tv.GELU or (type(act) is nn.GELU and act.approximate == "none")
    if not exact:
        described = f"GELU(approximate={act.approximate!r})" if isinstance(act, nn.GELU) else type(act).__name__
        yield _refusal(f"uses activation {described} in {name}.act", "nn.GELU (exact, approximate='none')",
                       "act_layer=nn.GELU")
    if mlp.fc1.bias is None or mlp.fc2.bias is None:
        yield _refusal(f"has no bias in {name} (proj_bias=False)", "MLP layers with bias", "proj_bias=True")
    if not isinstance(mlp.norm, nn.Identity):
        yield _refusal(f"normalises inside {name} (scale_mlp_norm=True)", "an MLP without norm",
                       "scale_mlp_norm=False")


def _norm_mismatches(name: str, norm: nn.Module, tv: SimpleNamespace) -> Iterator[str]:
    """``norm`` must be a LayerNorm with vitcourse's epsilon, weight and bias."""
    if type(norm) not in tv.LayerNorms:
        yield _refusal(f"uses {type(norm).__name__} as {name}", _LAYER_NORM, "the default norm_layer")
    elif norm.eps != LAYER_NORM_EPS:
        yield _refusal(f"uses LayerNorm eps={norm.eps:g} in {name}", _LAYER_NORM,
                       f"the default norm_layer (eps={LAYER_NORM_EPS:g})")
    elif norm.weight is None or norm.bias is None:
        yield _refusal(f"uses a LayerNorm without weight or bias in {name}", _LAYER_NORM, "the default norm_layer")


def _weight_mismatches(timm_model: nn.Module, model: VisionTransformer) -> Iterator[str]:
    """The weights must have exactly the names and shapes of ``model``'s."""
    ours = model.state_dict()
    theirs = timm_model.state_dict()
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    if missing or extra:
        yield (f"the timm model does not have this architecture: missing {missing[:3]}, unexpected "
               f"{extra[:3]}; build the timm model with vitcourse.timm_compat.timm_vit(config).")
        return
    for name, tensor in ours.items():
        if theirs[name].shape != tensor.shape:
            yield (f"parameter {name} has shape {tuple(theirs[name].shape)} in the timm model but "
                   f"{tuple(tensor.shape)} for this config; the config does not match the timm model.")
            return


def _config_mismatches(m: nn.Module, model: VisionTransformer) -> Iterator[str]:
    """Heads, dropout and drop-path rates: set by the config, invisible in the weights."""
    c = model.config
    dropouts = {"pos_drop": m.pos_drop}
    for i, block in enumerate(m.blocks):
        if block.attn.num_heads != c.heads:
            yield (f"the timm model has {block.attn.num_heads} attention heads in blocks.{i} but config.heads is "
                   f"{c.heads}; pass heads={block.attn.num_heads} in the ViTConfig.")
        dropouts.update({f"blocks.{i}.attn.proj_drop": block.attn.proj_drop,
                         f"blocks.{i}.mlp.drop1": block.mlp.drop1, f"blocks.{i}.mlp.drop2": block.mlp.drop2})
    for name, module in dropouts.items():
        if not math.isclose(module.p, c.dropout, abs_tol=1e-7):
            yield (f"the timm model uses dropout {module.p:g} in {name} but config.dropout is {c.dropout:g}; "
                   f"pass dropout={module.p:g} in the ViTConfig.")
    for i, (block, ours) in enumerate(zip(m.blocks, model.blocks)):
        for branch in (block.drop_path1, block.drop_path2):
            rate = 0.0 if isinstance(branch, nn.Identity) else branch.drop_prob
            if not math.isclose(rate, ours.drop_path.p, rel_tol=1e-6, abs_tol=1e-7):
                yield (f"the timm model's drop-path rate in blocks.{i} is {rate:g} but config.drop_path="
                       f"{c.drop_path:g} gives {ours.drop_path.p:g} there; pass the timm model's "
                       f"drop_path_rate as drop_path in the ViTConfig.")
