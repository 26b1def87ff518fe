"""The Pallas ternary matmul against the reference: interpreted on the CPU (CI), natively on a GPU."""
import jax
import jax.numpy as jnp
import pytest

from chimera_jax.ops.ternary import pack_ternary, ternary_matmul

ON_GPU = jax.default_backend() == "gpu"


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.mark.parametrize("activations", ["bf16", "int8"])
@pytest.mark.parametrize("m,k,n", [(1, 512, 64), (20, 256, 128), (130, 256, 128)] +
                         ([(1, 4096, 4096), (64, 4096, 1024), (512, 2048, 1024)] if ON_GPU else []))
def test_pallas_matches_reference(m, k, n, activations):
    w = jax.random.normal(jax.random.key(k + n), (k, n))
    x = jax.random.normal(jax.random.key(m), (m, k)).astype(jnp.bfloat16)
    tw = pack_ternary(w)
    ref = ternary_matmul(x, tw, impl="reference", activations=activations, out_dtype=jnp.float32)
    y = ternary_matmul(x, tw, impl="pallas", activations=activations, out_dtype=jnp.float32)
    assert y.shape == (m, n) and not bool(jnp.isnan(y).any())
    assert _rel(y, ref) < 1e-5


def test_one_row_dispatches_to_the_decode_kernel():
    """impl='pallas' with bf16 activations sends one row to the decode kernel (gemv.py) and more rows, or int8
    activations, to the general kernel; both agree with the reference (the test above)."""
    tw = pack_ternary(jax.random.normal(jax.random.key(0), (512, 64)))

    def kernels(m, activations="bf16"):
        x = jnp.ones((m, 512), jnp.bfloat16)
        text = str(jax.make_jaxpr(lambda x: ternary_matmul(x, tw, impl="pallas", activations=activations))(x))
        return "ternary_gemv" in text, "pallas_call" in text

    assert kernels(1) == (True, True)
    assert kernels(2) == (False, True)
    assert kernels(1, "int8") == (False, True)


def test_decode_tunables_are_the_sweeps_best_at_its_shapes():
    """The rule in decode_tunables reproduces the best (block_n, split_k) the H100 sweep found at each shape."""
    from kernels_pallas.ternary_matmul import gemv

    best = {(4096, 4096): (32, 2), (8192, 8192): (64, 2), (4096, 14336): (64, 1)}  # bench_ternary.json, M = 1
    for (k, n), (block_n, split_k) in best.items():
        t = gemv.decode_tunables(k, n)
        assert (t["block_n"], t["split_k"], t["mode"], t["prefetch"]) == (block_n, split_k, "fma", 2), (k, n, t)
    assert gemv.decode_supported(1, 4096, 4096) is None
    assert "one row" in gemv.decode_supported(16, 4096, 4096)
    assert "multiple of 256" in gemv.decode_supported(1, 384, 128)
