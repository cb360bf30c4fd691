"""``camkit explain`` on the models people have: a Hugging Face model saved in a local folder
(``--model hf:PATH``), detection and segmentation ``--target`` forms, and the flags users know
from the most used peer's script (``--image-path``, ``--output-dir``, ``--aug-smooth``,
``--eigen-smooth``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

import camkit
from camkit.cli import Preprocess, main, read_image
from camkit.detection import BoxTarget, cxcywh_to_xyxy

transformers = pytest.importorskip("transformers")


def _png(path: Path, h: int = 48, w: int = 72, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    assert cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: Any) -> dict[str, Any]:
    assert main([str(a) for a in argv]) == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out)
    return summary


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "fox"},
        label2id={"cat": 0, "dog": 1, "fox": 2},
    )
    folder = tmp_path_factory.mktemp("vit")
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    ).save_pretrained(folder)
    return folder


def test_hf_folder_with_its_image_processor(
    vit_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = _png(tmp_path / "a.png")
    out = tmp_path / "out"
    summary = _run(capsys, "explain", img, "--model", f"hf:{vit_folder}", "--out", out, "--json")
    assert summary["layer"] == "vit.layers.1.layernorm_before"
    assert summary["map_size"] == [64, 64]  # the processor's size
    assert summary["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert summary["preprocess"]["std"] == [0.25, 0.25, 0.25]
    assert summary["images"][0]["predicted"]["label"] in ("cat", "dog", "fox")
    written = np.load(out / "a_gradcam.npy")
    # the same map as explaining the loaded model on the processor's own output
    model = transformers.ViTForImageClassification.from_pretrained(vit_folder).eval()
    processor = transformers.ViTImageProcessor.from_pretrained(vit_folder)
    rgb = cv2.cvtColor(cv2.imread(str(img)), cv2.COLOR_BGR2RGB)
    batch = processor(images=[rgb], return_tensors="pt")
    res = camkit.explain(model, batch)
    np.testing.assert_allclose(written, res.maps[0].numpy(), atol=0.03)


def test_hf_folder_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(_png(tmp_path / "a.png")), "--model", f"hf:{tmp_path}"]) == 1
    assert "is not a folder holding a saved Hugging Face model (no config.json)" in (
        capsys.readouterr().err
    )


def test_peer_flag_aliases(
    vit_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = _png(tmp_path / "a.png")
    model = ["--model", f"hf:{vit_folder}"]
    ref = _run(capsys, "explain", img, *model, "--out", tmp_path / "ref", "--json",
               "--option", "aug_smooth=true", "--option", "eigen_smooth=true")  # fmt: skip
    got = _run(capsys, "explain", "--image-path", img, *model, "--output-dir", tmp_path / "got",
               "--aug-smooth", "--eigen-smooth", "--json")  # fmt: skip
    assert got["out"] == str(tmp_path / "got") and got["layer"] == ref["layer"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "got" / "a_gradcam.npy"), np.load(tmp_path / "ref" / "a_gradcam.npy")
    )
    _run(capsys, "explain", img, *model, "--out", tmp_path / "plain", "--json")
    assert not np.array_equal(
        np.load(tmp_path / "plain" / "a_gradcam.npy"), np.load(tmp_path / "got" / "a_gradcam.npy")
    )


def test_detection_box_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage4"],
    )
    config = transformers.DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=5,
        num_labels=3,
    )
    folder = tmp_path / "detr"
    transformers.DetrForObjectDetection(config).save_pretrained(folder)
    img = _png(tmp_path / "a.png")
    common = ["--model", f"hf:{folder}", "--size", "128", "--json"]
    by_index = _run(capsys, "explain", img, *common, "--target", "box:2", "--out", tmp_path / "i")
    assert by_index["layer"] == "model.backbone.model.encoder.stages.3"
    assert by_index["map_size"] == [128, 128]
    # the box query 2 predicts, as normalised (x1, y1, x2, y2), and a class
    model = transformers.DetrForObjectDetection.from_pretrained(folder).eval()
    _, x = Preprocess(size=(128, 128))(read_image(img))
    with torch.no_grad():
        pred = cxcywh_to_xyxy(model(x[None]).pred_boxes[0, 2])
    box = "box:" + ",".join(f"{float(v):.6f}" for v in pred) + "@1"
    by_box = _run(capsys, "explain", img, *common, "--target", box, "--out", tmp_path / "b")
    assert np.isfinite(np.load(tmp_path / "b" / "a_gradcam.npy")).all()
    # the box matched is query 2 itself: the same score as explaining query 2's class 1
    res = camkit.explain(model, x[None], target=BoxTarget(index=2, labels=None))
    with torch.no_grad():
        logit = float(model(x[None]).logits[0, 2, 1])
    assert by_box["images"][0]["target"]["score"] == pytest.approx(logit, rel=1e-4)
    assert by_index["images"][0]["target"]["score"] == pytest.approx(float(res.scores[0]), 1e-4)
    assert by_box["images"][0]["target"]["class"] is None  # a box target, not a class


def test_segmentation_mask_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        # 12 channels on the 16 x 16 fused map: 16 would fit both layouts, and the bare
        # activation there does not tell which
        decoder_hidden_size=12,
        num_labels=3,
    )
    folder = tmp_path / "segformer"
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(folder)
    img = _png(tmp_path / "a.png")
    args = ["--model", f"hf:{folder}", "--size", "64", "--json", "--out", tmp_path / "o"]
    summary = _run(capsys, "explain", img, *args, "--target", "mask:1")
    assert summary["layer"] == "decode_head.activation" and summary["map_size"] == [64, 64]
    assert main(["explain", str(img), "--model", f"hf:{folder}", "--target", "mask:x"]) == 2
    capsys.readouterr()
    assert main(
        [
            "explain",
            str(img),
            *map(str, args[:4]),
            "--out",
            str(tmp_path / "e"),
            "--target",
            "mask:7",
        ]
    )
    assert "--target mask:7: the model has 3 classes" in capsys.readouterr().err
