import pytest
import torch

from d2mc.context import Context
from d2mc.loading import LoadedModel
from tests.conftest import tiny_model


@pytest.fixture
def calibration():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def loaded_tiny():
    def make(family="llama", layers=8):
        from d2mc.arch import ModelArch

        model = tiny_model(family, num_hidden_layers=layers)
        return LoadedModel(model, None, ModelArch.from_config(model.config), f"tiny-{family}")

    return make


@pytest.fixture
def tiny_context(loaded_tiny, calibration):
    def make(family="llama", layers=8, teacher=True, profile=None):
        import copy

        loaded = loaded_tiny(family, layers)
        ctx = Context.from_loaded(loaded, profile=profile, calibration=calibration)
        if teacher:
            ctx.teacher = copy.deepcopy(loaded.model)
        return ctx

    return make
