import pytest

from m2f.data import make_synthetic


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic COCO-layout dataset shared by the data tests (read only)."""
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(str(root), num_train=6, num_val=4, image_size=96, seed=0)
