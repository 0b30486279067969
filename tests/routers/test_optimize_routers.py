"""What ``optimize`` says when it is given something other than routers."""

import pytest

import polar_compile
from polar_compile.routers.io import save_routers
from polar_compile.routers.modules import PolarRouters
from polar_compile.testing import TINY_MODELS


def test_optimize_given_a_router_file_path_says_to_load_it_first(tmp_path):
    model = TINY_MODELS["opt"]()
    path = tmp_path / "routers.safetensors"
    save_routers(PolarRouters.for_model(model, density=0.5), path)
    for given in (str(path), path):
        with pytest.raises(TypeError, match=r"not a path .*polar_compile.load_routers\(path, model\)"):
            polar_compile.optimize(model, given)
    with pytest.raises(TypeError, match="routers must be a PolarRouters .* got dict"):
        polar_compile.optimize(model, {})
    assert not hasattr(model, "_polar_plan")
