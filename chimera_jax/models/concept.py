"""The stage-1 concept autoencoder: pre-encoders -> HDM-SVQ hierarchical quantized encoder -> AU-Net renderer.

HDM-SVQ (hierarchical discrete multimodal sequence VQ): each modality's pre-encoder output goes through
``num_levels`` residual strided-conv blocks (2-D for images, 1-D for text and audio); after each level the
vectors are quantized by that level's quantizer, shared by every modality (one concept vocabulary per level).
The last level is the coarsest; its cells are the **concepts**. Each concept owns a segment of the output bytes
(an image patch, a run of text bytes), which the AU-Net renders autoregressively from the concept's
conditioning vector:

    cond = top-level quantized vector + sum over finer levels of a linear map of the finer quantized vectors
           inside the segment (space-to-depth).

In training the finer contributions are dropped per segment with probability ``fine_dropout``, so that the
AU-Net can also render from the concept alone, which is all the planner of stage 2 produces.
With ``slots.enabled`` the top level quantizes Slot Attention slots instead of grid cells; each segment then
reads the quantized slots through a learned per-segment attention query.

Batch (numpy, per modality m present in ``model.modalities``):
    image [b H W] uint8, image_mask [b H W] float (bytes that count in the loss), has_image [b] float
    text  [b T] int32 bytes, text_mask [b T] float, has_text [b] float
    audio [b T] uint8 8-bit samples, audio_mask [b T] float, has_audio [b] float
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import aunet as aunet_lib
from chimera_jax.layers import common, pre_encoders, quantizers
from chimera_jax.layers.slot_attention import SlotAttention

MODALITIES = ("image", "text", "audio")


def geometry(cfg, modality: str) -> dict:
    """Static shapes of one modality: grid per level, concepts per example, bytes per concept.

    image: input side cfg.image_size; text / audio: input length cfg.text_len / cfg.audio_len.
    """
    ls = cfg.level_stride
    if modality == "image":
        side, stride, nd = cfg.image_size, cfg.pre.image_stride, 2
    elif modality == "text":
        side, stride, nd = cfg.text_len, cfg.pre.text_stride, 1
    elif modality == "audio":
        side, stride, nd = cfg.audio_len, cfg.pre.audio_stride, 1
    else:
        raise ValueError(f"model.modalities has unknown modality {modality!r}; valid: {MODALITIES}")
    total = stride * ls ** cfg.num_levels
    if side % total:
        raise ValueError(f"{modality}: input size {side} must be divisible by pre-encoder stride {stride} * "
                         f"level_stride {ls} ** num_levels {cfg.num_levels} = {total}")
    grids = [side // (stride * ls ** (l + 1)) for l in range(cfg.num_levels)]
    top = grids[-1]
    patch = side // top
    return dict(nd=nd, grids=grids, top=top, patch=patch, concepts=top ** nd, segment=patch ** nd, side=side)


def to_segments(x, g: dict):
    """Bytes [b H W] (2-D) or [b T] (1-D) -> [b n s]: one row of s bytes per concept, raster order."""
    b = x.shape[0]
    if g["nd"] == 2:
        t, p = g["top"], g["patch"]
        return x.reshape(b, t, p, t, p).transpose(0, 1, 3, 2, 4).reshape(b, t * t, p * p)
    return x.reshape(b, g["top"], g["patch"])


def from_segments(x, g: dict):
    """The inverse of to_segments: [b n s] -> [b H W] or [b T]."""
    b = x.shape[0]
    if g["nd"] == 2:
        t, p = g["top"], g["patch"]
        return x.reshape(b, t, t, p, p).transpose(0, 1, 3, 2, 4).reshape(b, t * p, t * p)
    return x.reshape(b, g["top"] * g["patch"])


def space_to_depth(x, top: int, nd: int):
    """A finer grid [b G (G) c] -> [b n f*c]: the cells inside each top cell, concatenated."""
    b, c = x.shape[0], x.shape[-1]
    f = x.shape[1] // top
    if nd == 2:
        return x.reshape(b, top, f, top, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, top * top, f * f * c)
    return x.reshape(b, top, f * c)


class LevelBlock(nn.Module):
    """One HDM level: strided conv (downsampling by level_stride) then a residual block."""

    cfg: ml_collections.FrozenConfigDict
    nd: int

    @nn.compact
    def __call__(self, x):
        s = self.cfg.level_stride
        x = pre_encoders.Conv(self.cfg, self.cfg.d_model, (s,) * self.nd, stride=s, name="down")(x)
        return pre_encoders.ResBlock(self.cfg, (3,) * self.nd, name="res")(x)


class ConceptModel(nn.Module):
    cfg: ml_collections.FrozenConfigDict  # the model block (configs/stage1_vq.py)

    def setup(self):
        cfg = self.cfg
        self.mods = tuple(cfg.modalities)
        if not self.mods:
            raise ValueError("model.modalities is empty")
        self.geo = {m: geometry(cfg, m) for m in self.mods}
        enc = dict(image=pre_encoders.ImageEncoder, text=pre_encoders.TextEncoder, audio=pre_encoders.AudioEncoder)
        self.pre = {m: enc[m](cfg, name=f"pre_{m}") for m in self.mods}
        self.level_blocks = {f"{m}_{l}": LevelBlock(cfg, self.geo[m]["nd"], name=f"level_{m}_{l}")
                             for m in self.mods for l in range(cfg.num_levels)}
        qcfg = cfg.quantizer
        self.to_code = [common.dense(cfg, qcfg.code_dim, ("embed", "mlp"), name=f"to_code_{l}")
                        for l in range(cfg.num_levels)]
        self.quant = [quantizers.build(qcfg, name=f"quantizer_{l}") for l in range(cfg.num_levels)]
        self.fine_proj = {f"{m}_{l}": common.dense(cfg, cfg.d_model, ("mlp", "embed"), name=f"fine_{m}_{l}")
                          for m in self.mods for l in range(cfg.num_levels - 1)}
        self.top_proj = common.dense(cfg, cfg.d_model, ("mlp", "embed"), name="top_proj")
        if cfg.slots.enabled:
            self.slot_attn = {m: SlotAttention(cfg, name=f"slots_{m}") for m in self.mods}
            self.segment_queries = {m: self.param(f"segment_queries_{m}", nn.with_logical_partitioning(
                nn.initializers.normal(1.0), (None, "embed")), (self.geo[m]["concepts"], qcfg.code_dim))
                for m in self.mods}
        self.decoders = {m: aunet_lib.AUNet(cfg, name=f"aunet_{m}") for m in self.mods}

    # ------------------------------------------------------------------------------------------- encoding

    def _cell_masks(self, batch, m):
        """[b *grid] float per level: the example has the modality and the cell covers a scored byte."""
        g = self.geo[m]
        has = batch[f"has_{m}"].astype(jnp.float32)
        byte_mask = batch[f"{m}_mask"].astype(jnp.float32) * (has[:, None, None] if g["nd"] == 2 else has[:, None])
        out = []
        for grid in g["grids"]:
            f = g["side"] // grid
            if g["nd"] == 2:
                b = byte_mask.shape[0]
                cell = byte_mask.reshape(b, grid, f, grid, f).max(axis=(2, 4))
            else:
                cell = byte_mask.reshape(byte_mask.shape[0], grid, f).max(axis=2)
            out.append(cell)
        return out

    def encode(self, batch, *, train: bool = False):
        """Quantized levels per modality: {m: [dict(zq, indices, mask) per level]} and each level's aux.

        The top level's ``indices`` [b n] and ``mask`` [b n] are the concepts (slots when slots.enabled).
        """
        cfg = self.cfg
        for m in self.mods:
            for key in (m, f"{m}_mask", f"has_{m}"):
                if key not in batch:
                    raise ValueError(f"batch lacks {key!r}, needed by model.modalities={self.mods}")
        feats, masks = {}, {}
        for m in self.mods:
            feats[m] = self.pre[m](batch[m], batch[f"{m}_mask"]) if m == "text" else self.pre[m](batch[m])
            masks[m] = self._cell_masks(batch, m)
        out = {m: [] for m in self.mods}
        auxes = []
        for l in range(cfg.num_levels):
            flat, flat_mask, shapes = [], [], {}
            for m in self.mods:
                feats[m] = self.level_blocks[f"{m}_{l}"](feats[m])
                z = self.to_code[l](feats[m])                                           # [b *grid e]
                cmask = masks[m][l]
                if l == cfg.num_levels - 1 and cfg.slots.enabled:
                    b = z.shape[0]
                    slots, _ = self.slot_attn[m](z.reshape(b, -1, z.shape[-1]), cmask.reshape(b, -1))
                    z = slots                                                          # [b S e]
                    cmask = jnp.broadcast_to(batch[f"has_{m}"].astype(jnp.float32)[:, None], slots.shape[:2])
                shapes[m] = z.shape
                flat.append(z.reshape(-1, z.shape[-1]))
                flat_mask.append(cmask.reshape(-1))
            zq, idx, aux = self.quant[l](jnp.concatenate(flat), jnp.concatenate(flat_mask), update=train)
            auxes.append(aux)
            start = 0
            for m, fm in zip(self.mods, flat_mask):
                n = fm.shape[0]
                shape = shapes[m]
                out[m].append(dict(zq=zq[start:start + n].reshape(shape), indices=idx[start:start + n].reshape(
                    shape[:-1]), mask=fm.reshape(shape[:-1])))
                start += n
        for m in self.mods:  # concepts as flat sequences [b n]
            top = out[m][-1]
            b = top["zq"].shape[0]
            top["zq"] = top["zq"].reshape(b, -1, top["zq"].shape[-1])
            top["indices"] = top["indices"].reshape(b, -1)
            top["mask"] = top["mask"].reshape(b, -1)
        return out, auxes

    def condition(self, m: str, top_zq, fine=None, keep=None):
        """Conditioning vectors [b n d] of modality m's segments from the concepts' quantized vectors.

        top_zq [b n e] (grid concepts) or [b S e] (slots); fine: the finer levels' quantized grids or None
        (concept only, as in generation); keep [b n] multiplies the finer contribution (fine dropout).
        """
        cfg, g = self.cfg, self.geo[m]
        if cfg.slots.enabled:
            q = self.segment_queries[m].astype(top_zq.dtype)
            w = jax.nn.softmax(jnp.einsum("ne,bse->bns", q, top_zq) * top_zq.shape[-1] ** -0.5, axis=-1)
            top_zq = jnp.einsum("bns,bse->bne", w, top_zq)
        cond = self.top_proj(top_zq)
        if fine:
            extra = 0.0
            for l, level in enumerate(fine):
                extra = extra + self.fine_proj[f"{m}_{l}"](space_to_depth(level["zq"], g["top"], g["nd"]))
            cond = cond + extra * (1.0 if keep is None else keep[..., None])
        return cond

    def render_logits(self, m: str, targets, cond):
        """Teacher-forced AU-Net logits: targets [B s] bytes, cond [B d] -> [B s 256]."""
        return self.decoders[m](targets, cond)

    def top_codebook(self):
        """[K e] the concept vocabulary's vectors (the top level's codebook)."""
        return self.quant[-1].codebook_vectors()

    def lookup_concepts(self, indices):
        """Concept indices [...] -> quantized vectors [... e]."""
        return self.quant[-1].lookup(indices)

    # --------------------------------------------------------------------------------------------- forward

    def __call__(self, batch, *, train: bool = False):
        """-> (logits {m: [b n s 256]}, targets {m: [b n s]}, byte masks {m: [b n s]}, encoded, level auxes)."""
        cfg = self.cfg
        enc, auxes = self.encode(batch, train=train)
        logits, targets, masks = {}, {}, {}
        for m in self.mods:
            g = self.geo[m]
            levels = enc[m]
            b = batch[m].shape[0]
            keep = None
            if train and cfg.fine_dropout > 0 and cfg.num_levels > 1:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - cfg.fine_dropout,
                                            (b, g["concepts"])).astype(jnp.float32)
            cond = self.condition(m, levels[-1]["zq"], levels[:-1], keep)                # [b n d]
            tgt = to_segments(batch[m].astype(jnp.int32), g)                            # [b n s]
            has = batch[f"has_{m}"].astype(jnp.float32)
            bmask = to_segments(batch[f"{m}_mask"].astype(jnp.float32), g) * has[:, None, None]
            n, s = g["concepts"], g["segment"]
            lg = self.render_logits(m, tgt.reshape(b * n, s), cond.reshape(b * n, -1))
            logits[m], targets[m], masks[m] = lg.reshape(b, n, s, -1), tgt, bmask
        return logits, targets, masks, enc, auxes
