import os

# Tests run on the CPU; 8 simulated devices let sharding tests build real meshes in one process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' micro models spend most of their time in XLA compilation, not in running: on the CPU, skip most of the
# compiler's backend (LLVM) optimizations. The programs, the HLO passes and every tolerance are unchanged; the
# environment variable also reaches the `python -m chimera_jax...` subprocesses and the notebooks' kernels.
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite fully optimized.
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# The slowest files, slowest first. With `-n 2 --dist=loadfile` a worker takes whole files in collection order, so
# these go out first and the many short files fill in behind them, rather than one long file starting last while
# the other worker runs dry.
SLOW_FILES = (
    "tests/workflow/test_notebooks.py",
    "tests/models/test_presets.py",
    "tests/concept/test_stages.py",
    "tests/training/test_resume.py",
    "tests/training/test_multiprocess.py",
    "tests/test_generate_evaluate.py",
    "tests/chimera/test_chimera_lm.py",
    "tests/workflow/test_bench_train.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {path: i for i, path in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FILES)))  # stable: the rest keep order
