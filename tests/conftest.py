import os
import shutil
import tempfile

# Tests run on the CPU; 8 simulated devices let sharding tests build real meshes in one process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache per test session, shared by the xdist workers and by the processes the tests
# start (train.py, generate, the sweeps, the notebooks' kernels): many tests compile the same micro models, and on a
# 2-core CI machine compiling is most of the suite's time (a fifth less wall time for tests/training and
# tests/workflow with it). A program is looked up by its full HLO, compile options and flags, so a hit runs the
# executable a fresh compile would have produced. Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # a cache of the user's own is used as it is, and kept
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["CHIMERA_JAX_TEST_CACHE"] = tempfile.mkdtemp(
        prefix="chimera_jax_tests_")


def pytest_sessionfinish(session, exitstatus):
    # The controller (xdist workers inherit its environment, so they share its cache) removes the one it made.
    if not hasattr(session.config, "workerinput") and os.environ.get("CHIMERA_JAX_TEST_CACHE"):
        shutil.rmtree(os.environ["CHIMERA_JAX_TEST_CACHE"], ignore_errors=True)
