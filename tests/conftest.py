"""The one test bootstrap (sys.path and the salad_pack package, see _pack.bootstrap), the seed of
every test (seeds.py), and the ComfyUI fixtures."""
import os
import sys

import pytest

# pytest puts this folder (tests/) on sys.path before it imports conftest
from _pack import bootstrap
from seeds import replay_seed, seed_all, stable_seed

bootstrap()

pytest_plugins = ["kernel_fixtures"]   # seed / poison / fwd_path for the kernel tests

TINY = ["wan21_t2v_tiny", "wan21_i2v_tiny", "wan22_5b_tiny", "wan21_t2v_tiny_3blk"]


@pytest.fixture(autouse=True)
def _test_seed(request) -> int:
    """Every test starts from seeded global generators (torch, random, numpy) and prints the seed:
    a fixed one per test id (the same on every run, whatever ran before), or SALAD_TEST_SEED to
    replay.  Tests that want fresh random inputs each run draw their own (seeds.fresh_seed, or
    the kernel tests' ``seed`` fixture, kernel_fixtures.py) and print that too."""
    s = replay_seed()
    return seed_all(stable_seed(request.node.nodeid) if s is None else s, request.node.name)


@pytest.fixture(scope="session")
def comfyui_dir():
    from comfy_harness import find_comfyui
    return find_comfyui()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, comfyui_dir):
    from comfy_harness import make_fixtures
    d = tmp_path_factory.mktemp("diffusion_models")
    paths = make_fixtures(comfyui_dir, d, TINY)
    return {p.stem: p for p in paths}


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_models):
    """One headless ComfyUI for the whole session, with our pack and the tiny Wan models."""
    from comfy_harness import ComfyServer
    base = tmp_path_factory.mktemp("comfy_base")
    server = ComfyServer(base_dir=base)
    for p in tiny_models.values():
        (server.diffusion_dir / p.name).symlink_to(p)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if os.environ.get("SALAD_KEEP_LOGS"):
            print(server.log())


@pytest.fixture(scope="session")
def comfy_inprocess(comfyui_dir):
    """ComfyUI's modules imported into this process (CPU), for tests that drive the ModelPatcher directly."""
    if str(comfyui_dir) not in sys.path:
        sys.path.insert(0, str(comfyui_dir))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd
    return comfy
