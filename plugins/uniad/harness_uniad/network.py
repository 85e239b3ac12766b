"""UniAD's reconstruction network: a neighbour-masked transformer with a layer-wise query decoder.

Written from the paper (You et al., NeurIPS 2022, Section 3) and checked against the authors'
``models/reconstructions/uniad.py`` (zhiyuanyou/UniAD at a5b9d9d); the module and parameter names
are the authors' (``input_proj``, ``pos_embed.row_embed``, ``transformer.encoder.layers.0.self_attn``,
``transformer.decoder.layers.0.learned_embed``, ...), so their ``state_dict`` loads as it is
(``tests/test_golden_uniad.py``). What each part does, as their code does it:

- tokens: the aggregated feature map (B, C, H, W) becomes H*W tokens (sequence-first, row-major);
- feature jittering (training only, :func:`add_jitter`): with probability ``prob`` per batch, every
  token gets Gaussian noise of standard deviation ``scale * ||token|| / C``; the loss target stays
  the clean feature;
- ``input_proj`` C -> hidden, a position embedding (learned row/column tables, or DETR's
  normalised sine) added to queries and keys of every attention (never to values);
- encoder: post-norm (or pre-norm) layers of self-attention and a ReLU feed-forward block;
- decoder: each layer starts again from its own learned queries (``learned_embed``, one per token
  position, shared over the batch): they attend first to the encoder output (``self_attn``, keys
  and values = encoder output), then to the previous decoder layer's output (``multihead_attn``;
  the encoder output for the first layer), then the feed-forward block; a final LayerNorm;
- neighbour masking (:func:`neighbour_mask`): a token may not attend to the tokens within its
  ``neighbour_size`` window (itself included), in the attentions switched on by ``mask``
  (encoder, decoder first, decoder second);
- ``output_proj`` hidden -> C, back to (B, C, H, W); the anomaly map is the L2 norm of the
  reconstruction error over channels, upsampled by ``instride`` with ``UpsamplingBilinear2d``
  (bilinear, ``align_corners=True``).

Initialisation as theirs (``initializer: xavier_uniform``): every ``nn.Linear`` (the attentions'
output projections included) Xavier-uniform with zero bias; the attentions' packed input
projections keep PyTorch's own Xavier init, the learned query and row/column tables their defaults
(N(0, 1) and U(0, 1)).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: ``pos_embed_type`` values (the authors' aliases v2 = sine, v3 = learned are accepted too).
POSITION_EMBEDDINGS = ("learned", "sine")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


def neighbour_mask(feature_size: Sequence[int], neighbour_size: Sequence[int]) -> torch.Tensor:
    """The additive attention mask that hides each token's neighbourhood.

    Token ``(i, j)`` may not attend to token ``(k, l)`` when ``|i - k| <= nh // 2`` and
    ``|j - l| <= nw // 2`` (a window of ``nh`` x ``nw`` for odd sizes, clipped at the border, the
    token itself included): UniAD's ``generate_mask``, which blocks exactly that window.

    Parameters
    ----------
    feature_size : (int, int)
        Token grid (H, W).
    neighbour_size : (int, int)
        Window (nh, nw).

    Returns
    -------
    torch.Tensor
        (H*W, H*W) float32: ``-inf`` where attention is blocked, 0 elsewhere (row = query).
    """
    h, w = (int(v) for v in feature_size)
    nh, nw = (int(v) for v in neighbour_size)
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    near = ((rows[:, None] - rows[None, :]).abs() <= nh // 2) & ((cols[:, None] - cols[None, :]).abs() <= nw // 2)
    return torch.zeros(h * w, h * w).masked_fill(near, float("-inf"))


def add_jitter(tokens: torch.Tensor, scale: float, prob: float, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """Feature jittering: Gaussian noise scaled by each token's norm divided by its width.

    Parameters
    ----------
    tokens : torch.Tensor
        (N, B, C) feature tokens.
    scale, prob : float
        Noise scale (20 in UniAD's config) and the probability that a batch is jittered (1.0).
    generator : torch.Generator, optional
        Source of the noise (and of the coin when ``prob < 1``); the global RNG when omitted.

    Returns
    -------
    torch.Tensor
        ``tokens + randn * scale * ||token|| / C``.
    """
    # UniAD draws the coin from Python's ``random``; with prob = 1 it always jitters, so no coin is
    # drawn here and the noise is the same draw from the same torch generator as theirs.
    if prob < 1.0 and float(torch.rand((), generator=generator, device=tokens.device)) > prob:
        return tokens
    norms = tokens.norm(dim=2, keepdim=True) / tokens.shape[2]
    noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    return tokens + noise * norms * scale


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute position: a column table and a row table, concatenated (column first)."""

    def __init__(self, feature_size: Sequence[int], num_pos_feats: int) -> None:
        super().__init__()
        self.feature_size = tuple(int(v) for v in feature_size)
        self.row_embed = nn.Embedding(self.feature_size[0], num_pos_feats)
        self.col_embed = nn.Embedding(self.feature_size[1], num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> torch.Tensor:
        """(H*W, 2 * num_pos_feats), row-major."""
        h, w = self.feature_size
        cols = self.col_embed.weight[None, :, :].expand(h, w, -1)
        rows = self.row_embed.weight[:, None, :].expand(h, w, -1)
        return torch.cat([cols, rows], dim=-1).flatten(0, 1)


class PositionEmbeddingSine(nn.Module):
    """DETR's sine embedding with normalised coordinates (scale 2*pi), row half first."""

    def __init__(self, feature_size: Sequence[int], num_pos_feats: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.feature_size = tuple(int(v) for v in feature_size)
        self.num_pos_feats = int(num_pos_feats)
        self.temperature = float(temperature)

    def forward(self) -> torch.Tensor:
        """(H*W, 2 * num_pos_feats), row-major (no parameters)."""
        h, w = self.feature_size
        eps, scale = 1e-6, 2 * math.pi
        y = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w) / (h + eps) * scale
        x = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w) / (w + eps) * scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        def encode(coord: torch.Tensor) -> torch.Tensor:
            angles = coord[:, :, None] / dim_t
            return torch.stack((angles[:, :, 0::2].sin(), angles[:, :, 1::2].cos()), dim=3).flatten(2)

        return torch.cat((encode(y), encode(x)), dim=2).flatten(0, 1)


def _with_pos(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention (positions on queries and keys) and a feed-forward block, post- or pre-norm."""

    def __init__(self, hidden_dim: int, nhead: int, dim_feedforward: int, dropout: float, activation: str,
                 normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, nhead, dropout=dropout)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor:
        """(N, B, D) -> (N, B, D)."""
        if self.normalize_before:
            x = self.norm1(src)
            qk = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(qk, qk, value=x, attn_mask=mask)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        qk = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, value=src, attn_mask=mask)[0]))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """A decoder layer that starts from its own learned queries (UniAD's layer-wise query decoder).

    The queries attend to the encoder output (``self_attn``), then to the previous layer's output
    (``multihead_attn``), then pass a feed-forward block.
    """

    def __init__(self, hidden_dim: int, num_queries: int, nhead: int, dim_feedforward: int, dropout: float,
                 activation: str, normalize_before: bool) -> None:
        super().__init__()
        self.learned_embed = nn.Embedding(num_queries, hidden_dim)
        self.self_attn = nn.MultiheadAttention(hidden_dim, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(hidden_dim, nhead, dropout=dropout)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, previous: torch.Tensor, memory: torch.Tensor, mask_first: torch.Tensor | None,
                mask_second: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor:
        """Decode from the learned queries.

        Parameters
        ----------
        previous : torch.Tensor
            (N, B, D) output of the previous decoder layer (the encoder output for the first).
        memory : torch.Tensor
            (N, B, D) encoder output.
        mask_first, mask_second : torch.Tensor or None
            Masks of the attention to ``memory`` and to ``previous``.
        pos : torch.Tensor or None
            (N, B, D) position embedding.
        """
        tgt = self.learned_embed.weight[:, None, :].expand(-1, memory.shape[1], -1)
        keys_memory, keys_previous = _with_pos(memory, pos), _with_pos(previous, pos)
        if self.normalize_before:
            x = self.norm1(tgt)
            tgt = tgt + self.dropout1(self.self_attn(_with_pos(x, pos), keys_memory, value=memory,
                                                     attn_mask=mask_first)[0])
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(_with_pos(x, pos), keys_previous, value=previous,
                                                          attn_mask=mask_second)[0])
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(_with_pos(tgt, pos), keys_memory, value=memory,
                                                            attn_mask=mask_first)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(_with_pos(tgt, pos), keys_previous,
                                                                 value=previous, attn_mask=mask_second)[0]))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, with a final LayerNorm in the pre-norm variant only."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor:
        """(N, B, D) -> (N, B, D)."""
        for layer in self.layers:
            src = layer(src, mask, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of query decoder layers and a final LayerNorm."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, memory: torch.Tensor, mask_first: torch.Tensor | None, mask_second: torch.Tensor | None,
                pos: torch.Tensor | None) -> torch.Tensor:
        """(N, B, D) encoder output -> (N, B, D)."""
        out = memory
        for layer in self.layers:
            out = layer(out, memory, mask_first, mask_second, pos)
        return self.norm(out)


class Transformer(nn.Module):
    """Encoder and decoder, with the neighbour mask built once for the token grid."""

    def __init__(self, hidden_dim: int, feature_size: Sequence[int], neighbor_size: Sequence[int] | None,
                 neighbor_mask: Sequence[bool], nhead: int, num_encoder_layers: int, num_decoder_layers: int,
                 dim_feedforward: int, dropout: float = 0.1, activation: str = "relu",
                 normalize_before: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, not {activation!r}")
        self.feature_size = tuple(int(v) for v in feature_size)
        num_queries = self.feature_size[0] * self.feature_size[1]
        encoder_layer = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers,
                                          nn.LayerNorm(hidden_dim) if normalize_before else None)
        decoder_layer = TransformerDecoderLayer(hidden_dim, num_queries, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(hidden_dim))
        self.use_mask = tuple(bool(m) for m in neighbor_mask) if neighbor_size else (False, False, False)
        if len(self.use_mask) != 3:
            raise ValueError(f"neighbor_mask needs three switches (encoder, decoder first, decoder second), "
                             f"got {tuple(neighbor_mask)!r}")
        # Not in the state dict (the authors rebuild it at every forward pass), so their keys load.
        if any(self.use_mask) and all(side // 2 <= int(n) // 2 for side, n in zip(self.feature_size, neighbor_size)):
            # The central token's window covers the grid: softmax over no key gives NaN.
            raise ValueError(f"neighbor_size {tuple(neighbor_size)} hides every token of the {self.feature_size[0]} x "
                             f"{self.feature_size[1]} feature grid from some token: use a smaller window or a larger "
                             "image_size")
        mask = neighbour_mask(self.feature_size, neighbor_size) if any(self.use_mask) else torch.zeros(0)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(N, B, D) tokens and (N, D) position embedding -> (N, B, D) decoder output."""
        pos = pos[:, None, :].expand(-1, src.shape[1], -1)
        mask = self.mask.to(src.dtype) if any(self.use_mask) else None
        enc, dec1, dec2 = (mask if used else None for used in self.use_mask)
        memory = self.encoder(src, enc, pos)
        return self.decoder(memory, dec1, dec2, pos)


class UniADReconstruction(nn.Module):
    """UniAD's feature reconstruction model (the authors' ``UniAD`` module, same parameter names).

    Parameters
    ----------
    inplanes : int
        Channels of the aggregated feature map (272 for EfficientNet-b4 stages 1-4).
    instride : int
        Stride of the feature map; the anomaly map is upsampled by it (16).
    feature_size : (int, int)
        Token grid (14, 14 at 224 px).
    hidden_dim, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
    normalize_before
        The transformer (256, 8, 4, 4, 1024, 0.1, relu, post-norm in the MVTec-AD config).
    pos_embed_type : {"learned", "sine"}
    neighbor_size : (int, int) or None
        Neighbour-mask window (7, 7); None: no mask.
    neighbor_mask : three bools
        Mask in the encoder, the decoder's first and its second attention.
    jitter_scale, jitter_prob : float
        Feature jittering (20, 1.0); scale 0 switches it off.
    """

    def __init__(self, inplanes: int, instride: int, feature_size: Sequence[int], hidden_dim: int = 256,
                 nhead: int = 8, num_encoder_layers: int = 4, num_decoder_layers: int = 4,
                 dim_feedforward: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 normalize_before: bool = False, pos_embed_type: str = "learned",
                 neighbor_size: Sequence[int] | None = (7, 7), neighbor_mask: Sequence[bool] = (True, True, True),
                 jitter_scale: float = 20.0, jitter_prob: float = 1.0) -> None:
        super().__init__()
        self.feature_size = tuple(int(v) for v in feature_size)
        self.instride = int(instride)
        self.jitter_scale, self.jitter_prob = float(jitter_scale), float(jitter_prob)
        kind = {"v2": "sine", "v3": "learned"}.get(pos_embed_type, pos_embed_type)
        if kind == "learned":
            self.pos_embed: nn.Module = PositionEmbeddingLearned(self.feature_size, hidden_dim // 2)
        elif kind == "sine":
            self.pos_embed = PositionEmbeddingSine(self.feature_size, hidden_dim // 2)
        else:
            raise ValueError(f"pos_embed_type must be one of {POSITION_EMBEDDINGS}, not {pos_embed_type!r}")
        self.transformer = Transformer(hidden_dim, self.feature_size, neighbor_size, neighbor_mask, nhead,
                                       num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
                                       normalize_before)
        self.input_proj = nn.Linear(inplanes, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, inplanes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' ``initializer: xavier_uniform``: every Linear Xavier-uniform, zero bias."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def reconstruct(self, features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstructed features (B, C, H, W); jittered input only in training mode.

        Parameters
        ----------
        features : torch.Tensor
            (B, C, H, W) aggregated features, (H, W) = ``feature_size``.
        generator : torch.Generator, optional
            Source of the jitter noise (the global RNG when omitted).
        """
        b, c, h, w = features.shape
        if (h, w) != self.feature_size:
            raise ValueError(f"features are {h} x {w}, the network was built for {self.feature_size}")
        tokens = features.flatten(2).permute(2, 0, 1)  # (H*W, B, C), row-major
        if self.training and self.jitter_scale > 0:
            tokens = add_jitter(tokens, self.jitter_scale, self.jitter_prob, generator)
        out = self.output_proj(self.transformer(self.input_proj(tokens), self.pos_embed().to(tokens)))
        return out.permute(1, 2, 0).reshape(b, c, h, w)

    def anomaly_map(self, features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """L2 distance over channels, upsampled by ``instride`` (bilinear, ``align_corners=True``): (B, 1, sH, sW)."""
        pred = torch.sqrt(((reconstruction - features) ** 2).sum(dim=1, keepdim=True))
        if self.instride == 1:
            return pred
        return F.interpolate(pred, scale_factor=self.instride, mode="bilinear", align_corners=True)

    def forward(self, features: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (B, C, H, W), anomaly map (B, 1, instride*H, instride*W))."""
        rec = self.reconstruct(features, generator)
        return rec, self.anomaly_map(features, rec)
