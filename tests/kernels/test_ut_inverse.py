"""The UT inverse kernel (T = (I + A)^-1 per chunk, by 16 x 16 blocks) against numpy's inverse and XLA's matmul
recursion: float64 in the Pallas interpreter on the CPU (CI); float32 natively on a GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera_jax.ops.gated_delta_rule import unit_lower_inverse
from kernels_pallas.gated_delta_rule.ut_inverse import unit_lower_inverse_pallas

ON_GPU = jax.default_backend() == "gpu"


def _a(key, shape, dtype, scale=0.3):
    return jnp.tril(jax.random.normal(key, shape, dtype) * scale, -1)


@pytest.mark.skipif(ON_GPU, reason="float64 interpreter check; the GPU runs the native case below")
@pytest.mark.parametrize("c, leaf", [(64, 16), (32, 16), (64, 32), (16, 16), (8, 16)])
def test_interpreted_float64(c, leaf):
    with jax.enable_x64(True):
        a = _a(jax.random.key(c + leaf), (2, 3, c, c), jnp.float64)
        got = unit_lower_inverse_pallas(a, leaf=leaf)
        assert got.shape == a.shape and got.dtype == a.dtype
        np.testing.assert_allclose(got, np.linalg.inv(np.eye(c) + np.asarray(a)), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got, unit_lower_inverse(a), rtol=1e-10, atol=1e-12)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="leaf"):
        unit_lower_inverse_pallas(jnp.zeros((2, 48, 48)), leaf=32)
    with pytest.raises(ValueError, match=r"\[... c c\]"):
        unit_lower_inverse_pallas(jnp.zeros((2, 48, 32)))


@pytest.mark.skipif(not ON_GPU, reason="native kernel needs a GPU")
@pytest.mark.parametrize("num_warps", [None, 1, 2, 8])
def test_native_gpu_float32(num_warps):
    # A as the prepare builds it: beta (k k^T) with unit-norm k and beta in (0, 1)
    ks = jax.random.split(jax.random.key(0), 2)
    k = jax.random.normal(ks[0], (96, 64, 128), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(jax.random.normal(ks[1], (96, 64, 1)))
    a = jnp.tril(beta * jnp.einsum("nik,njk->nij", k, k, precision="highest"), -1)
    got = unit_lower_inverse_pallas(a, num_warps=num_warps)
    want = np.linalg.inv(np.eye(64) + np.asarray(a, np.float64))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="the GPU compiles and runs the kernel natively above")
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_lowers_to_a_triton_kernel_for_cuda(monkeypatch):
    """With no GPU here, check that the kernel at its real shape (c = 64, float32) lowers through Pallas to a
    Triton module inside a cuda custom call: block shapes, ref slices and dots all pass Pallas's Triton lowering.
    (PTX compilation happens on a GPU only; jax 0.11.2's lowering asks the device for its GPU generation, so an
    H100's is supplied.)"""
    import functools

    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    fn = jax.jit(functools.partial(unit_lower_inverse_pallas, interpret=False))
    target = "__gpu$xla.gpu.triton"
    exported = jax.export.export(fn, platforms=["cuda"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(
        jax.ShapeDtypeStruct((8, 64, 64), jnp.float32))
    text = exported.mlir_module()
    assert target in text and 'name = "gdn_ut_inverse"' in text and "num_warps = 2" in text
