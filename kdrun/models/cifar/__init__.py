"""The CIFAR-100 knowledge-distillation model zoo of the CRD/RepDistiller and mdistiller benchmarks.

Every network is defined as in the CRD/RepDistiller code (Tian et al., "Contrastive Representation
Distillation", ICLR 2020), with the same module names, so that the benchmark's released checkpoints
(``{"model": state_dict, ...}``) load with ``load_state_dict(strict=True)``. Parameter counts are at
100 classes.

===============  ===============================================  ======  ==========================
constructor      module                                           params  paper
===============  ===============================================  ======  ==========================
``resnet8``      :mod:`kdrun.models.cifar.resnet`                 0.08M   He et al. 2016
``resnet14``     :mod:`kdrun.models.cifar.resnet`                 0.18M   He et al. 2016
``resnet20``     :mod:`kdrun.models.cifar.resnet`                 0.28M   He et al. 2016
``resnet32``     :mod:`kdrun.models.cifar.resnet`                 0.47M   He et al. 2016
``resnet44``     :mod:`kdrun.models.cifar.resnet`                 0.67M   He et al. 2016
``resnet56``     :mod:`kdrun.models.cifar.resnet`                 0.86M   He et al. 2016
``resnet110``    :mod:`kdrun.models.cifar.resnet`                 1.74M   He et al. 2016
``resnet8x4``    :mod:`kdrun.models.cifar.resnet`                 1.23M   He et al. 2016
``resnet32x4``   :mod:`kdrun.models.cifar.resnet`                 7.43M   He et al. 2016
``wrn_16_1``     :mod:`kdrun.models.cifar.wrn`                    0.18M   Zagoruyko & Komodakis 2016
``wrn_16_2``     :mod:`kdrun.models.cifar.wrn`                    0.70M   Zagoruyko & Komodakis 2016
``wrn_40_1``     :mod:`kdrun.models.cifar.wrn`                    0.57M   Zagoruyko & Komodakis 2016
``wrn_40_2``     :mod:`kdrun.models.cifar.wrn`                    2.26M   Zagoruyko & Komodakis 2016
``vgg8``         :mod:`kdrun.models.cifar.vgg`                    3.97M   Simonyan & Zisserman 2015
``vgg11``        :mod:`kdrun.models.cifar.vgg`                    9.28M   Simonyan & Zisserman 2015
``vgg13``        :mod:`kdrun.models.cifar.vgg`                    9.46M   Simonyan & Zisserman 2015
``vgg16``        :mod:`kdrun.models.cifar.vgg`                    14.77M  Simonyan & Zisserman 2015
``vgg19``        :mod:`kdrun.models.cifar.vgg`                    20.09M  Simonyan & Zisserman 2015
``mobilenetv2``  :mod:`kdrun.models.cifar.mobilenetv2`            0.81M   Sandler et al. 2018
``ShuffleV1``    :mod:`kdrun.models.cifar.shufflenetv1`           0.95M   Zhang et al. 2018
``ShuffleV2``    :mod:`kdrun.models.cifar.shufflenetv2`           1.36M   Ma et al. 2018
``ResNet18``     :mod:`kdrun.models.cifar.resnet_imagenet_style`  11.22M  He et al. 2016
``ResNet34``     :mod:`kdrun.models.cifar.resnet_imagenet_style`  21.33M  He et al. 2016
``ResNet50``     :mod:`kdrun.models.cifar.resnet_imagenet_style`  23.71M  He et al. 2016
``ResNet101``    :mod:`kdrun.models.cifar.resnet_imagenet_style`  42.70M  He et al. 2016
===============  ===============================================  ======  ==========================

``vgg8``...``vgg19`` are the batch-norm variants (RepDistiller's ``vgg8_bn``...), as in the
benchmark's model table; ``mobilenetv2`` is RepDistiller's half-width ``mobile_half`` (also exported
under that name).

Every constructor is ``f(num_classes: int = 100, in_chans: int = 3) -> nn.Module`` and the model's
``forward`` returns logits only. Intermediate features are read with
:class:`kdrun.models.taps.Tapped`: each model class declares ``CLASSIFIER`` (its final linear layer,
whose input is the ``"pre_logits"`` tap: RepDistiller's pooled feature, mdistiller's ``pooled_feat``)
and ``FEATURE_TAPS`` (on the instance where the block count varies):

* ``"stageK"`` is RepDistiller's ``forward(is_feat=True)`` feature ``feat[K]`` (mdistiller's
  ``feats[K]``): ``stage0`` the stem output, ``stage1``... the stage outputs. For the ResNets, VGGs and
  ShuffleNets these are *post-ReLU* (VGG: relu(blockK); ResNets/ShuffleNets: relu(bn1(conv1)) and the
  ``layerK`` outputs); WRN's are the raw residual sums of its pre-activation blocks (``stage0`` =
  ``conv1``); MobileNetV2's are ``conv1`` and ``blocks[1, 2, 4, 6]``.
* ``"preact_stageK"`` is the ``forward(is_feat=True, preact=True)`` feature K (mdistiller's
  ``preact_feats[K]``): the last block's value before its final ReLU (VGG: the ``blockK`` BatchNorm
  output; ResNets/ShuffleNets: the residual sum or concatenation, at the block's parameter-free
  ``preact`` module; ShuffleNetV2's is *unshuffled*, as in RepDistiller), WRN: the next BN
  (``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1``); ``preact_stage0`` is ``stage0`` and
  MobileNetV2's ``preact_stageK`` is ``stageK``, as in RepDistiller's lists.
* ``"pool"`` is the global-pooling module (its output is ``(N, C, 1, 1)``).

The ResNets, WRNs and VGGs also declare ``BN_BEFORE_RELU``: the module paths of RepDistiller's /
mdistiller's ``get_bn_before_relu`` (the BatchNorm behind ``preact_stage1``...), from which OFD computes
its margin. The parameter-free modules that make these tensors hookable (``act0..act4``, ``relu``,
``preact``) add no state_dict entries. ``tests/models/test_cifar_taps.py`` checks every tap of every
model against a re-derivation of RepDistiller's forward.
"""
from __future__ import annotations

from .mobilenetv2 import mobile_half, mobilenetv2
from .resnet import resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44, resnet56, resnet110
from .resnet_imagenet_style import ResNet18, ResNet34, ResNet50, ResNet101
from .shufflenetv1 import ShuffleV1
from .shufflenetv2 import ShuffleV2
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "mobilenetv2",
    "mobile_half",
    "ShuffleV1",
    "ShuffleV2",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
]
