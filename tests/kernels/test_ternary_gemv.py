"""The decode ternary kernel (interpreted on a CPU, native on a GPU) against a float64 oracle and the op reference."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera_jax.ops.ternary import pack_ternary, ternary_matmul
from kernels_pallas.ternary_matmul.gemv import (
    default_tunables,
    ternary_gemv,
    ternary_gemv_reference,
)

ON_GPU = jax.default_backend() == "gpu"  # natively compiled there (with larger shapes), interpreted elsewhere


def _case(m, k, n, dtype, seed=0):
    tw = pack_ternary(jax.random.normal(jax.random.key(seed + k + n), (k, n)))
    x = jax.random.normal(jax.random.key(seed + m), (m, k)).astype(dtype)
    return x, tw


def _oracle(x, tw):
    with jax.enable_x64(True):
        return np.asarray(ternary_gemv_reference(x, tw.packed, tw.scale, dtype=jnp.float64))


def _assert_close(y, x, tw):
    """float32 results to float32 rounding of the sum; bf16 results to one bf16 rounding of each value."""
    ref = _oracle(x, tw)
    out_f32 = y.dtype == jnp.float32
    y = np.asarray(y.astype(jnp.float32), np.float64)
    assert y.shape == ref.shape and np.isfinite(y).all()
    norm = np.abs(ref).max()
    tol = 1e-5 * norm if out_f32 else 2.0 ** -8 * np.abs(ref) + 1e-6 * norm
    np.testing.assert_array_less(np.abs(y - ref), tol)
    f32 = np.asarray(ternary_matmul(x, tw, impl="reference", out_dtype=jnp.float32))  # the op's own oracle
    np.testing.assert_array_less(np.abs(f32 - ref), 1e-5 * norm)
    np.testing.assert_array_less(np.abs(y - f32), tol + 1e-5 * norm)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("m,k,n", [(1, 512, 128), (3, 384, 256), (16, 256, 128), (64, 256, 128)] +
                         ([(1, 4096, 4096), (16, 8192, 1024), (64, 4096, 2048)] if ON_GPU else []))
def test_matches_reference(m, k, n, dtype):
    x, tw = _case(m, k, n, dtype)
    y = ternary_gemv(x, tw.packed, tw.scale)
    assert y.dtype == dtype
    _assert_close(y, x, tw)


@pytest.mark.parametrize("m,kw", [
    (1, dict(mode="dot", block_n=16, groups_per_step=1)),  # scales on the unpacked weights
    (3, dict(mode="dot", block_n=64, num_warps=2)),  # scales on each group's partial
    (1, dict(mode="fma")),  # prefetch 2
    (1, dict(mode="fma", prefetch=0)),
    (3, dict(mode="fma", block_n=64, groups_per_step=2)),
    (1, dict(mode="fma", split_k=2, block_n=32)),
    (3, dict(mode="dot", split_k=4, groups_per_step=1)),
    (16, dict(mode="dot", split_k=2, block_n=128, groups_per_step=2)),
])
def test_tunables_agree(m, kw):
    """Every mode, block size, step size, prefetch distance and split-k (float32 atomics) computes the same
    product (on a GPU also the fma mode's inline-PTX widening, which the interpreter replaces by jnp ops)."""
    x, tw = _case(m, 2048 if ON_GPU else 512, 256 if ON_GPU else 128, jnp.bfloat16, seed=1)
    _assert_close(ternary_gemv(x, tw.packed, tw.scale, **kw), x, tw)
    y32 = ternary_gemv(x, tw.packed, tw.scale, out_dtype=jnp.float32, **kw)
    assert y32.dtype == jnp.float32
    _assert_close(y32, x, tw)


def test_default_tunables():
    t = default_tunables(1, 8192, 8192)
    assert t["mode"] == "dot" and t["prefetch"] == 0 and 8192 // t["block_n"] == 256
    assert (8192 // 128) % t["groups_per_step"] == 0
    assert default_tunables(64, 8192, 8192)["block_n"] == 64  # wider blocks re-read x less, >= 128 programs
    f = default_tunables(1, 8192, 8192, mode="fma")
    assert f["mode"] == "fma" and f["prefetch"] == 2
    assert default_tunables(1, 4096, 4096)["block_n"] == 32  # not 16, even if only 128 programs
    assert default_tunables(1, 384, 48)["block_n"] == 16  # what divides n
    assert default_tunables(1, 384, 256, split_k=3)["groups_per_step"] == 1


@pytest.mark.parametrize("shape_x,k,n,kw,match", [
    ((65, 256), 256, 128, {}, r"1 <= m <= 64.*\(65, 256\)"),
    ((16, 256), 256, 128, dict(mode="fma"), r"m <= 8.*\(16, 256\)"),
    ((1, 512), 256, 128, {}, r"packed must be \[k/4 n\] with k = 512.*\(64, 128\)"),
    ((1, 256), 256, 128, dict(block_n=48), r"block_n=48 for n=128"),
    ((1, 256), 256, 128, dict(split_k=3), r"split_k must divide the 2 groups"),
    ((1, 256), 256, 128, dict(groups_per_step=4), r"groups_per_step must divide"),
    ((1, 256), 256, 128, dict(mode="wgmma"), r"mode must be one of"),
])
def test_bad_shapes_raise(shape_x, k, n, kw, match):
    tw = pack_ternary(jnp.ones((k, n)))
    with pytest.raises(ValueError, match=match):
        ternary_gemv(jnp.ones(shape_x, jnp.bfloat16), tw.packed, tw.scale, **kw)


def test_bad_scale_and_group_raise():
    tw = pack_ternary(jnp.ones((256, 128)))
    with pytest.raises(ValueError, match=r"scale must be \[k/128 n\] = \(2, 128\).*\(1, 128\)"):
        ternary_gemv(jnp.ones((1, 256)), tw.packed, tw.scale[:1])
    with pytest.raises(ValueError, match=r"k must be a multiple of 128.*\(1, 192\)"):
        ternary_gemv(jnp.ones((1, 192)), jnp.zeros((48, 128), jnp.uint8), jnp.ones((1, 128), jnp.bfloat16))


@pytest.mark.parametrize("m,kw", [(1, {}), (1, dict(mode="fma")), (16, {}),
                                  (64, dict(block_n=32, groups_per_step=8))])
def test_lowers_to_one_triton_call(m, kw, monkeypatch):
    """Lowered for CUDA (from this CPU, against an H100's description): one Triton kernel and no other op."""
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    k = n = 8192
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k // 4, n), jnp.uint8),
            jax.ShapeDtypeStruct((k // 128, n), jnp.bfloat16))
    text = ternary_gemv.trace(*args, interpret=False, **kw).lower(lowering_platforms=("cuda",)).as_text()
    ops = [line.split("=", 1)[1].split()[0] for line in text.splitlines()
           if "=" in line and "stablehlo." in line.split("=", 1)[1].split("(")[0]]
    assert ops == ["stablehlo.custom_call"] and "__gpu$xla.gpu.triton" in text


@pytest.mark.skipif(ON_GPU, reason="the smoke run is the CPU path (interpreted kernels)")
def test_bench_smoke(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "experiments"))
    import bench_ternary

    rows, sweep = bench_ternary.main(["--smoke", f"--out={tmp_path}"])
    md = (tmp_path / "bench_ternary.md").read_text()
    assert "ours-gemv" in md and "## ours-gemv tunable sweep" in md
    gemv = [r for r in rows if r["impl"] == "ours-gemv"]
    assert len(gemv) == 2 and all(r.get("us", 0) > 0 for r in gemv)  # M = 1 and 3
    default = {r["M"]: r["us"] for r in rows if r["impl"] == "ours-gemv-default"}
    assert all(r["us"] <= default[r["M"]] for r in gemv)  # the best of the sweep includes the defaults
    assert sweep and all("us" in r or "error" in r for r in sweep)
    assert all(r.get("us", 0) > 0 for r in rows if r["impl"] == "ours-xla") and "xla-bf16 / ours-xla" in md
