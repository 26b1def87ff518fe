"""Concept model pieces: segment layout, missing modalities, slot attention, the perceptual hook."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax.layers import pre_encoders
from chimera_jax.layers.slot_attention import slot_attention_weights
from chimera_jax.models import concept
from chimera_jax.stages.vq import feature_distance
from configs import stage1_vq


def _model_cfg(**kw):
    c = stage1_vq.get_config("quantizer=fsq,data=both,size=tiny")
    m = c.model
    m.d_model, m.quantizer.code_dim = 16, 8
    m.quantizer.levels, m.quantizer.num_codes = (4, 4), 16
    m.pre.image_blocks, m.pre.text_layers = 0, 1
    m.aunet.widths, m.aunet.stride = (16, 16), 4
    m.update(kw)
    return ml_collections.FrozenConfigDict(m)


def test_segments_round_trip_and_geometry():
    cfg = _model_cfg()
    g = concept.geometry(cfg, "image")
    assert (g["grids"], g["concepts"], g["segment"]) == ([8, 4], 16, 64)
    x = np.arange(2 * 32 * 32).reshape(2, 32, 32)
    seg = concept.to_segments(x, g)
    np.testing.assert_array_equal(seg[0, 1], x[0, :8, 8:16].reshape(-1))  # concept 1 = the second 8x8 patch
    np.testing.assert_array_equal(concept.from_segments(seg, g), x)
    gt = concept.geometry(cfg, "text")
    assert (gt["concepts"], gt["segment"]) == (4, 16)


def _batch(b=2):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (b, 32, 32)).astype(np.uint8)
    text = rng.integers(1, 256, (b, 64)).astype(np.int32)
    return dict(image=img, image_mask=np.ones((b, 32, 32), np.float32), has_image=np.ones(b, np.float32),
                text=text, text_mask=np.ones((b, 64), np.float32), has_text=np.array([1.0, 0.0], np.float32))


def test_missing_modality_is_masked_everywhere():
    cfg = _model_cfg()
    model = concept.ConceptModel(cfg)
    batch = _batch()
    params = model.init(jax.random.PRNGKey(0), batch)
    apply = jax.jit(model.apply)
    logits, targets, masks, enc, _ = apply(params, batch)
    assert logits["text"].shape == (2, 4, 16, 256)
    assert masks["text"][1].sum() == 0 and masks["text"][0].sum() == 64
    for level in enc["text"]:
        assert np.asarray(level["mask"][1]).sum() == 0
    # The missing example's text does not change the concepts of the other modality or the other example.
    other = dict(batch, text=batch["text"].copy())
    other["text"][1] = 7
    _, _, _, enc2, _ = apply(params, other)
    np.testing.assert_array_equal(enc2["image"][-1]["indices"], enc["image"][-1]["indices"])


def test_slot_front_end_quantizes_slots():
    a = ml_collections.ConfigDict(dict(enabled=True, num_slots=3, iters=2, eps=1e-8))
    cfg = _model_cfg(slots=a, modalities=("image",))
    model = concept.ConceptModel(cfg)
    batch = {k: v for k, v in _batch().items() if "text" not in k}
    params = model.init(jax.random.PRNGKey(0), batch)
    logits, _, _, enc, _ = model.apply(params, batch)
    assert enc["image"][-1]["indices"].shape == (2, 3)
    assert logits["image"].shape == (2, 16, 64, 256)
    w = slot_attention_weights(jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4)),
                               jax.random.normal(jax.random.PRNGKey(2), (2, 5, 4)), jnp.ones((2, 5)), 1e-8)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def test_audio_pre_encoder_shape():
    cfg = _model_cfg()
    enc = pre_encoders.AudioEncoder(cfg)
    x = jnp.zeros((2, 64))
    out, _ = enc.init_with_output(jax.random.PRNGKey(0), x)
    assert out.shape == (2, 16, 16)


def test_perceptual_hook_matches_a_numpy_computation():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        a, b = rng.random((2, 5, 5)), rng.random((2, 5, 5))
        k = rng.normal(size=(3, 3, 1, 4))
        w = np.array([1.0, 2.0, 0.5, 1.5])
        got = feature_distance(jnp.asarray(a), jnp.asarray(b), [jnp.asarray(k)], [jnp.asarray(w)])

        def features(x):  # 'SAME' 3x3 convolution (cross-correlation) then ReLU, by loops
            xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
            out = np.zeros(x.shape + (4,))
            for i in range(5):
                for j in range(5):
                    out[:, i, j] = np.einsum("bhw,hwc->bc", xp[:, i:i + 3, j:j + 3], k[:, :, 0])
            out = np.maximum(out, 0)
            return out / np.sqrt((out ** 2).sum(-1, keepdims=True) + 1e-10)

        np.testing.assert_allclose(got, np.mean(((features(a) - features(b)) ** 2 * w).sum(-1)), rtol=1e-10)
        assert float(feature_distance(jnp.asarray(a), jnp.asarray(a), [jnp.asarray(k)])) == 0.0
