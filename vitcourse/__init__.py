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
* :mod:`vitcourse.distill` and :mod:`vitcourse.mae` - DeiT's distillation losses and a masked autoencoder;
  :mod:`vitcourse.lowlabel` - chapter 10's comparison of them
* :mod:`vitcourse.pretrained` and :mod:`vitcourse.transfer` - a timm checkpoint into the course's ViT, and
  chapter 8's probe / fine-tune / scratch comparison

The training wing, in the order a run's config travels (config -> data -> model -> checkpoint):

* :mod:`vitcourse.config` - ``TrainConfig`` (every value checked), the named presets, run folders
* :mod:`vitcourse.data` - CIFAR-10, image folders and the offline stand-in, as one ``DataBundle``
* :mod:`vitcourse.models` and :mod:`vitcourse.objectives` - the network a config names, and what it minimises
* :mod:`vitcourse.train` - the loop; :mod:`vitcourse.checkpoint` - what a run writes, checked before it is trusted
* :mod:`vitcourse.evaluate` - a checkpoint's test accuracy
* :mod:`vitcourse.paths` - where runs and data live, atomic writes, folder locks (imports nothing of the course)
* :mod:`vitcourse.cli` - the ``vitcourse`` command: every argument parser of the package, and nothing else imports it
"""

from .vit import PRESETS, VisionTransformer, ViTConfig, count_parameters

__all__ = ["ViTConfig", "VisionTransformer", "count_parameters", "PRESETS"]
__version__ = "0.1.0"
