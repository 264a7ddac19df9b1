import pytest
import torch

# Tiny test models gain nothing from intra-op threads, and threads oversubscribe a loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one intra-op thread, whatever an earlier test set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The curvature tests' small cases, each built once per module that asks: (model, x, y, dense Hessian).
@pytest.fixture(scope="module")
def mlp_case():
    from _hessian_refs import make_mlp_case

    return make_mlp_case()


@pytest.fixture(scope="module")
def vit_case():
    from _hessian_refs import make_vit_case

    return make_vit_case()
