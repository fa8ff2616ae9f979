"""vitcourse: the tested reference code of the course "Vision Transformers from scratch".

One small module per idea:

* :mod:`vitcourse.attention` - softmax, scaled dot-product attention, multi-head self-attention
* :mod:`vitcourse.patches` - images to patch sequences and back, the patch embedding
* :mod:`vitcourse.encoder` - the MLP and the pre-norm encoder block
* :mod:`vitcourse.vit` - ``ViTConfig`` and ``VisionTransformer``
* :mod:`vitcourse.timm_compat` - weights to and from timm's ViT
* :mod:`vitcourse.analysis` - CLS attention, attention rollout, attention distance, what positions and patch
  filters learned
* :mod:`vitcourse.viz` - the plots the chapters share
* :mod:`vitcourse.stats` - sampling noise (test set and seeds), comparisons, trends and chance: every verdict
* :mod:`vitcourse.recipes`, :mod:`vitcourse.experiments`, :mod:`vitcourse.ultimus_report` - the measured
  experiments and the sentences chapters 5, 9 and 6 choose from their numbers
* :mod:`vitcourse.optim` - the one parameter-group rule (weight decay on weight matrices only)
"""

from .vit import PRESETS, VisionTransformer, ViTConfig, count_parameters

__all__ = ["ViTConfig", "VisionTransformer", "count_parameters", "PRESETS"]
__version__ = "0.1.0"
