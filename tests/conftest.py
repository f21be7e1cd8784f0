"""Fixtures shared by the test modules."""
import pytest


@pytest.fixture(scope="module")
def ray_session():
    """A private 2-CPU local Ray for one module (never a cluster left running on the machine)."""
    import ray

    from pipeline.ray_env import init_local

    if ray.is_initialized():
        pytest.skip("a Ray session is already initialised in this process")
    init_local(num_cpus=2, object_store_memory=200 * 1024 * 1024)
    yield
    ray.shutdown()
