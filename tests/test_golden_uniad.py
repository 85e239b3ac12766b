"""Golden tests: our UniAD reconstruction network, loaded with the authors' state_dict, against their outputs.

``tests/golden/uniad/`` holds, for two tiny configurations of the authors' ``UniAD`` module
(zhiyuanyou/UniAD at a5b9d9d, ``models/reconstructions/uniad.py``), its state_dict under the
official key names (random, perturbed weights), a fixed random input feature map and the
outputs of their code: ``feature_rec`` and ``pred`` in eval mode, the neighbour mask of their
``generate_mask``, the position embedding, and ``feature_rec`` in training mode (jitter and
dropout drawn from seeded RNGs). See its README for how it was made. Also the parameter count
of the authors' MVTec-AD model, counted by instantiating their code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

try:
    import harness_uniad  # noqa: F401
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "uniad"))

from harness_uniad.network import UniADReconstruction

GOLDEN = Path(__file__).resolve().parent / "golden" / "uniad"
REFERENCE = json.loads((GOLDEN / "uniad_reference.json").read_text())
TOL = dict(atol=1e-4, rtol=1e-4)


def build(name: str) -> UniADReconstruction:
    """Our network with the authors' keyword arguments of configuration ``name``."""
    c = REFERENCE[name]["config"]
    return UniADReconstruction(
        c["inplanes"][0], c["instrides"][0], c["feature_size"], hidden_dim=c["hidden_dim"], nhead=c["nhead"],
        num_encoder_layers=c["num_encoder_layers"], num_decoder_layers=c["num_decoder_layers"],
        dim_feedforward=c["dim_feedforward"], dropout=c["dropout"], activation=c["activation"],
        normalize_before=c["normalize_before"], pos_embed_type=c["pos_embed_type"],
        neighbor_size=c["neighbor_mask"]["neighbor_size"], neighbor_mask=c["neighbor_mask"]["mask"],
        jitter_scale=c["feature_jitter"]["scale"], jitter_prob=c["feature_jitter"]["prob"])


@pytest.fixture(scope="module", params=["learned", "sine"])
def golden(request):
    """(name, our network with the official state loaded strictly, the official inputs and outputs)."""
    from safetensors.torch import load_file

    name = request.param
    net = build(name)
    state = load_file(str(GOLDEN / f"uniad_{name}_state.safetensors"))
    net.load_state_dict(state, strict=True)  # every official key, no other
    assert len(state) == REFERENCE[name]["tensors"]
    return name, net.eval(), load_file(str(GOLDEN / f"uniad_{name}_io.safetensors"))


@torch.no_grad()
def test_reconstruction_and_anomaly_map_equal_the_authors(golden):
    name, net, io = golden
    rec, pred = net(io["in.feature_align"])
    torch.testing.assert_close(rec, io["out.feature_rec"], **TOL)
    torch.testing.assert_close(pred, io["out.pred"], **TOL)
    c = REFERENCE[name]["config"]
    assert pred.shape[-2:] == tuple(s * c["instrides"][0] for s in c["feature_size"])


def test_neighbour_mask_and_position_embedding_equal_the_authors(golden):
    _, net, io = golden
    assert torch.equal(torch.isinf(net.transformer.mask), torch.isinf(io["out.mask"]))
    assert torch.equal(net.transformer.mask == 0, io["out.mask"] == 0)
    torch.testing.assert_close(net.pos_embed().detach(), io["out.pos_embed"], **TOL)


@torch.no_grad()
def test_training_forward_jitters_and_drops_out_as_the_authors(golden):
    _, net, io = golden
    net.train()
    try:
        torch.manual_seed(3)  # the seed their training-mode forward ran under
        rec = net.reconstruct(io["in.feature_align"])
    finally:
        net.eval()
    torch.testing.assert_close(rec, io["out.train_feature_rec"], **TOL)
    assert (rec - io["out.feature_rec"]).abs().max() > 1e-2  # jitter and dropout changed the output


def test_paper_profile_parameter_count_equals_the_authors():
    """The authors' MVTec-AD model: 27,059,008 parameters, counted by instantiating their code.

    Theirs: the whole EfficientNet-b4 of EfficientNet-PyTorch (19,341,616, classifier included,
    although only the stem and blocks 0-21 feed the features: 3,635,984), the MFCN neck (none) and
    the reconstruction transformer (7,717,392). Our extractor drops the blocks after stage 4 (never
    run), so its count is the part theirs uses; with timm's whole ``tf_efficientnet_b4`` (the same
    network) in its place the total is theirs.
    """
    import timm

    from harness_uniad.plugin import harness_methods

    (spec,) = harness_methods()
    with torch.device("meta"):
        method = spec.factory(spec.resolve("paper"))
        full_backbone = timm.create_model("tf_efficientnet_b4", pretrained=False)
    counts = method.parameter_count()
    theirs = REFERENCE["paper_parameter_count"]
    assert counts["reconstruction"] == theirs["reconstruction"] == 7_717_392
    assert counts["backbone"] == theirs["backbone_stem_and_blocks_0_21"] == 3_635_984
    full = sum(p.numel() for p in full_backbone.parameters())
    assert full == theirs["backbone_total"]
    assert full + counts["reconstruction"] == theirs["total"] == 27_059_008
    assert method.features.channels == sum(theirs["outplanes"]) == 272
    assert method.reconstruction.feature_size == (14, 14)
