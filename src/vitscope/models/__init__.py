"""The papers' architectures, registered in timm's registry on import."""
from vitscope.models._registry import create_model, list_models, register  # noqa: F401

# Import each family so its @register functions run.
from vitscope.models import vit_cb  # noqa: F401,E402
from vitscope.models import convit_cifar  # noqa: F401,E402
