r"""python -m jaxscaleseg.train --config configs/coco_lvis_resnet50_ess.py --workdir DIR

COCO+LVIS (1284 classes), DeepLabV3+ ResNet-50 (output stride 16), ESS head.

Variants: ``:smoke``, ``:original`` (the original code's labels, negative-set rule and
BatchNorm momenta, below; it needs ``python -m jaxscaleseg.data.prepare coco_lvis
--builder_config original_masks ...``). Needs the prepared dataset (``python -m
jaxscaleseg.data.prepare coco_lvis ...``); the ImageNet backbone is torchvision's, fetched once.

Where each setting comes from ("the original code" is github.com/shipra25jain/ESSNet):

* batch, k and D: the authors' reply in the original repository's issue #6 says the second
  arXiv version of the paper (arXiv:2012.07489v2) gives COCO+LVIS's batch size, k and D. Its
  text could not be found from this session, so the values below are chosen here and are
  not known to be the paper's: D = 12 and k = 7 (as the paper's other large label sets,
  ADE20K and COCO-Stuff), batch 10. Check them against v2 before reporting a reproduction.
* temperature 20, margin 0.2, separation weight 1, optimiser, poly schedules, BatchNorm
  momenta, negatives: as ``ade20k_mobilenetv2_ess.py``, with the sources given there.
* random scale 0.5-2.0, crop with padding, flip: the original code's COCO+LVIS augmentation
  (main.py lines 190-198); the crop 512 as its ADE20K command (README.md line 28).
* labels: the ``lvis_ids`` builder config, each COCO-Stuff stuff id mapped once to its
  COCO+LVIS class: chosen here. The original mask script remaps stuff ids in place in the
  order of its table, so stuff "blanket" and "cabinet" end up as other classes (93 -> 1217,
  98 -> 1283; see ``jaxscaleseg/data/builders/coco_lvis.py``); ``:original`` uses the
  ``original_masks`` builder config, whose labels equal that script's.
* chosen here: ResNet-50 at output stride 16, base lr 0.01 (as COCO-Stuff 10k, from which the
  stuff classes come), 200 000 iterations (twice COCO-Stuff's: 7x the classes), LVIS
  repeat-factor sampling with threshold 0.001 for the long tail (the original code has a
  repeat-factor sampler, utils/rf_sampler.py, not read here), evaluation shrinks images to
  fit and pads to 640x640 (COCO images are at most 640 on a side), every pixel scored.
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.base_config()
    c.dataset.name = "seg_coco_lvis"
    c.dataset.num_classes = 1284
    c.dataset.crop_size = (512, 512)
    c.dataset.eval_crop_size = (640, 640)
    c.dataset.repeat_factor_threshold = 0.001
    c.batch_size = 10
    c.num_train_steps = 200_000
    c.model.backbone = "resnet50"
    c.model.output_stride = 16
    c.model.embedding_dim = 12
    c.model.pretrained = "torchvision:resnet50"
    c.loss.name = "ess"
    c.loss.num_neighbors = 7
    c.optim.base_lr = 0.01
    names = config_schema.variants(variant)
    if "original" in names:
        config_schema.original_model_and_loss(c)
        c.dataset.config = "original_masks"
    if "smoke" in names:
        config_schema.smoke(c)
    return c
