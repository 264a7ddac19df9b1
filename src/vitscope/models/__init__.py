"""The papers' architectures, registered in timm's registry on import (one module per family)."""
import vitscope.models.alternet  # noqa: F401  (AlterNet, HDVW)
import vitscope.models.resnet_cifar  # noqa: F401  (CIFAR-stem and smoothing ResNets)
from vitscope.models import convit_cifar, vit_cb  # noqa: F401  (importing a family registers its models)
from vitscope.models._registry import create_model, list_models, register  # noqa: F401
