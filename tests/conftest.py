import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "gpu"),
                     help="array backend the tests run on: numpy (cpu) or cupy (gpu)")


@pytest.fixture(scope="session")
def device(request):
    """'cpu' or 'gpu': where tests put their arrays (pytest --device gpu)."""
    name = request.config.getoption("--device")
    if name == "gpu":
        from distprop import backend

        if not backend.gpu_available():
            pytest.skip("--device gpu given but cupy sees no GPU")
    return name


@pytest.fixture
def rng():
    return np.random.default_rng(0)
