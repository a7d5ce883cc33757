"""Fixtures of the converter tests; the configs and weights come from convert_fixtures."""

import pytest
from convert_fixtures import random_state, small_config


@pytest.fixture(scope="module", params=["resnet", "swin"])
def backbone_kind(request):
    return request.param


@pytest.fixture(scope="module")
def small_model_state(backbone_kind):
    config = small_config(backbone_kind)
    return config, random_state(config)
