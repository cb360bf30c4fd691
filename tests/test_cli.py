"""The ``camkit`` command: explain, methods, plugins, demo; errors leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

import camkit
import camkit.demo
from camkit.cli import (
    Preprocess,
    load_model,
    main,
    parse_value,
    preprocess_from_torchvision,
    read_image,
    staged_output,
)
from camkit.cli.values import method_named

tv = pytest.importorskip("torchvision")

PREP = ["--size", "64", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]

TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Tiny()


def fixed_size():
    """Works on 16 x 16 inputs only."""
    return nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16 * 16, 4)
    )
'''


def _png(path: Path, h: int = 48, w: int = 72, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] = (40, 220, 90)
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    ckpt = d / "resnet18.pt"
    torch.save(tv.models.resnet18(weights=None).state_dict(), ckpt)
    broken = d / "broken.png"
    broken.write_bytes(b"this is not an image")
    truncated = d / "truncated.png"
    truncated.write_bytes(_png(d / "full.png").read_bytes()[:120])  # a PNG header, no pixels
    return {
        "a": _png(d / "a.png"),
        "b": _png(d / "b.jpg", 60, 40, seed=1),
        "ckpt": ckpt,
        "broken": broken,
        "truncated": truncated,
    }


@pytest.fixture
def tiny_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module with a factory in the current directory, under a name unique to the test."""
    name = f"tinynet_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def _run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _leftovers(root: Path) -> list[Path]:
    return list(root.glob(".camkit-*"))


# -- explain ---------------------------------------------------------------------------------
def test_explain_checkpoint_writes_overlay_and_map(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = _run(
        capsys, "explain", files["a"], "--model", "torchvision:resnet18", "--weights",
        files["ckpt"], *PREP, "--out", out, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    overlay = cv2.imread(str(out / "a_gradcam.png"))
    assert overlay is not None and overlay.shape == (64, 64, 3)
    m = np.load(out / "a_gradcam.npy")
    assert m.dtype == np.float32 and m.shape == (64, 64)
    assert m.min() >= 0.0 and m.max() <= 1.0 and m.max() == pytest.approx(1.0)
    assert "a_gradcam.png" in stdout and "a_gradcam.npy" in stdout and "layer4" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["a_gradcam.npy", "a_gradcam.png"]
    assert not _leftovers(tmp_path)

    # the saved map is camkit.explain's map of the preprocessed image
    model = tv.models.resnet18(weights=None)
    model.load_state_dict(torch.load(files["ckpt"], weights_only=True))
    prep = Preprocess(size=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3)
    shown, x = prep(read_image(files["a"]))
    ref = camkit.explain(model.eval(), x[None], method="gradcam")
    np.testing.assert_allclose(m, ref.maps[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(
        overlay[:, :, ::-1], camkit.overlay(shown, ref.maps[0], alpha=0.5)
    )


def test_explain_json_batches_and_targets_per_image(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nested" / "out"
    code, stdout, err = _run(
        capsys, "explain", files["a"], files["b"], "--model", "torchvision:resnet18",
        "--weights", files["ckpt"], *PREP, "--size", "48,80", "--target", "7,9",
        "--batch-size", "1", "--method", "gradcam++", "--option", "relu=false",
        "--alpha", "0.3", "--colormap", "viridis", "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["method"] == "gradcampp" and summary["layer"] == "layer4"
    assert summary["preprocess"]["size"] == [48, 80] and summary["device"] == "cpu"
    assert [r["target"]["class"] for r in summary["images"]] == [7, 9]
    for r in summary["images"]:
        assert r["target"]["given"] and 0 < r["target"]["probability"] < 1
    for r in summary["images"]:
        assert isinstance(r["predicted"]["class"], int) and 0 < r["predicted"]["probability"] < 1
        assert np.load(r["map"]).shape == (48, 80)
        assert read_image(r["overlay"]).shape == (48, 80, 3)
    assert Path(summary["images"][1]["map"]).name == "b_gradcampp.npy"


def test_explain_with_torchvision_weights_name_uses_transforms_and_categories(
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # torchvision reads weights already in torch's cache without downloading them
    weights = tv.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / Path(weights.url).name).write_bytes(files["ckpt"].read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "out"
    code, stdout, err = _run(
        capsys, "explain", files["a"], "--model", "torchvision:resnet18",
        "--weights", "IMAGENET1K_V1", "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    rec = summary["images"][0]
    categories = weights.meta["categories"]
    assert rec["predicted"]["label"] == categories[rec["predicted"]["class"]]
    assert summary["preprocess"]["resize"] == 256 and summary["preprocess"]["size"] == [224, 224]
    assert np.load(out / "a_gradcam.npy").shape == (224, 224)


def test_preprocess_equals_torchvision_transforms() -> None:
    weights = tv.models.ResNet50_Weights.IMAGENET1K_V2
    prep = preprocess_from_torchvision(weights)
    assert (prep.resize, prep.size) == (232, (224, 224))
    rng = np.random.default_rng(0)
    for shape in [(300, 400, 3), (401, 299, 3), (100, 150, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        shown, x = prep(rgb)
        ref = weights.transforms()(torch.from_numpy(rgb).permute(2, 0, 1))
        assert shown.shape == (224, 224, 3) and shown.dtype == np.uint8
        torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)


def test_explain_module_factory(
    tiny_module: str, tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = load_model(f"{tiny_module}:build").model
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "tiny.ckpt")
    (tmp_path / "labels.txt").write_text("circle\nsquare\ntriangle\nstar\n")
    code, stdout, err = _run(
        capsys, "explain", files["a"], "--model", f"{tiny_module}:build", "--weights",
        "tiny.ckpt", "--size", "24,32", "--layer", "features.0", "--labels", "labels.txt",
        "--target", "1", "--out", "maps",
    )  # fmt: skip
    assert code == 0, err
    assert "explained  1 square" in stdout and "at layer features.0" in stdout
    assert "ImageNet" in stdout  # the default mean and std are reported
    assert np.load(tmp_path / "maps" / "a_gradcam.npy").shape == (24, 32)
    assert "random weights" not in err  # a factory builds its own weights
    # a file path works as the module part too
    code, _, err = _run(
        capsys, "explain", files["a"], "--model", f"./{tiny_module}.py:build", "--size", "16",
        "--out", "maps2",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "maps2" / "a_gradcam.png").is_file()


def test_explain_through_the_console_script(files: dict[str, Path], tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("camkit")
    if not script.exists():
        pytest.skip("the camkit console script is not installed next to this interpreter")
    out = tmp_path / "out"
    argv = [
        script, "explain", files["a"], "--model", "torchvision:resnet18", "--weights",
        files["ckpt"], *PREP, "--out", out,
    ]  # fmt: skip
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{out / 'a_gradcam.png'}" in proc.stdout and "wrote 1 overlay(s)" in proc.stdout
    assert proc.stderr == ""  # quiet when not in a terminal
    assert np.load(out / "a_gradcam.npy").shape == (64, 64)


# -- errors ----------------------------------------------------------------------------------
ERRORS = {
    "unreadable image": (["{broken}", "--model", "torchvision:resnet18"], 1, "cannot read image"),
    "missing image": (["{a}x", "--model", "torchvision:resnet18"], 1, "no such file"),
    "unknown torchvision model": (
        ["{a}", "--model", "torchvision:resnet1800"],
        1,
        "unknown torchvision model 'resnet1800'. Did you mean 'resnet18'",
    ),
    "spec without a colon": (["{a}", "--model", "resnet18"], 1, "is not one of torchvision:NAME"),
    "unknown module": (
        ["{a}", "--model", "no_such_module_xyz:build"],
        1,
        "no module named 'no_such_module_xyz'",
    ),
    "missing timm": (["{a}", "--model", "timm:resnet18"], 1, "pip install timm"),
    "checkpoint of another model": (
        ["{a}", "--model", "{tiny}:build", "--weights", "{ckpt}"],
        1,
        "missing key(s): features.0.weight",
    ),
    "checkpoint with another head": (
        ["{a}", "--model", "torchvision:resnet18", "--weights", "{ckpt}", "--num-classes", "10"],
        1,
        "2 shape mismatch(es): fc.weight (1000, 512) in the checkpoint, (10, 512) in the "
        "model, fc.bias (1000,) in the checkpoint, (10,) in the model. The checkpoint's "
        "classifier has 1000 classes: pass --num-classes 1000.",
    ),
    "pickled model": (
        ["{a}", "--model", "{tiny}:build", "--weights", "{pickled}"],
        1,
        "it holds a pickled reference to ",
    ),
    "unknown weights name": (
        ["{a}", "--model", "torchvision:resnet18", "--weights", "IMAGENET9K"],
        1,
        "valid names: DEFAULT, IMAGENET1K_V1",
    ),
    "unknown method": (
        ["{a}", "--model", "torchvision:resnet18", "--method", "gradcamm"],
        1,
        "unknown method 'gradcamm'. Did you mean 'gradcam'",
    ),
    "unknown layer": (
        ["{a}", "--model", "{tiny}:build", "--layer", "feature"],
        1,
        "Did you mean 'features'",
    ),
    "unknown option": (
        ["{a}", "--model", "{tiny}:build", "--option", "rleu=false"],
        1,
        "unknown option 'rleu'",
    ),
    "class out of range": (["{a}", "--model", "{tiny}:build", "--target", "7"], 1, "[0, 3]"),
    "model fails on the input": (
        ["{a}", "--model", "{tiny}:fixed_size", "--size", "8"],
        1,
        "the model failed on a batch of shape (1, 3, 8, 8)",
    ),
    "too many targets": (
        ["{a}", "--model", "torchvision:resnet18", "--target", "1,2"],
        2,
        "--target has 2 classes for 1 image(s)",
    ),
    "two images, one name": (
        ["{a}", "{a}", "--model", "torchvision:resnet18"],
        2,
        "would both write a_gradcam.png",
    ),
    "bad size": (["{a}", "--model", "torchvision:resnet18", "--size", "0"], 2, "--size"),
    "zero std": (["{a}", "--model", "torchvision:resnet18", "--std", "0.2,0,0.2"], 2, "--std"),
    "bad colormap": (
        ["{a}", "--model", "torchvision:resnet18", "--colormap", "pink"],
        2,
        "--colormap expects one of jet, turbo, viridis, inferno, magma, plasma, cividis, hot; "
        "got 'pink'.",
    ),
    "alpha out of range": (
        ["{a}", "--model", "torchvision:resnet18", "--alpha", "1.5"],
        2,
        "--alpha expects a value in [0, 1]; got 1.5.",
    ),
    "bad option syntax": (
        ["{a}", "--model", "torchvision:resnet18", "--option", "relu"],
        2,
        "expected key=value",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_exit_non_zero_with_a_message_and_no_output(
    case: str,
    files: dict[str, Path],
    tiny_module: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if case == "missing timm":
        monkeypatch.setitem(sys.modules, "timm", None)  # absent even where it is installed
    pickled = tmp_path / "whole.pt"
    if case == "pickled model":
        torch.save(load_model(f"{tiny_module}:build").model, pickled)
    argv, status, message = ERRORS[case]
    subs = {**{k: str(v) for k, v in files.items()}, "tiny": tiny_module, "pickled": pickled}
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "explain", *[a.format(**subs) for a in argv], "--out", out)
    assert code == status
    assert err.strip().splitlines()[-1].startswith("camkit: error: "), err
    assert message in err.replace("\n", " "), err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists() and not _leftovers(tmp_path)


def test_unknown_method_names_the_listing_of_its_caller() -> None:
    with pytest.raises(camkit.UnknownMethodError) as cli_error:
        method_named("gradcamm")
    with pytest.raises(camkit.UnknownMethodError) as api_error:
        camkit.default_registry().get("gradcamm")
    cli_text, api_text = str(cli_error.value), str(api_error.value)
    assert cli_text.startswith("unknown method 'gradcamm'. Did you mean 'gradcam'")
    assert cli_text.endswith("? List them with 'camkit methods'.")
    assert api_text == cli_text.replace(
        "List them with 'camkit methods'.", "List methods with camkit.list_methods()."
    )


def test_failure_midway_leaves_nothing_half_written(
    files: dict[str, Path], tiny_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the truncated PNG passes the header check; it fails after a.png's files were written
    argv = [
        "explain", files["a"], files["truncated"], "--model", f"{tiny_module}:build",
        "--size", "16", "--batch-size", "1",
    ]  # fmt: skip
    fresh = tmp_path / "fresh" / "out"
    code, _, err = _run(capsys, *argv, "--out", fresh)
    assert code == 1 and "cannot read image" in err and "truncated.png" in err
    assert not (tmp_path / "fresh").exists()
    assert not _leftovers(tmp_path)

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, _ = _run(capsys, *argv, "--out", existing)
    assert code == 1
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_existing_output_folder_keeps_other_files(
    files: dict[str, Path], tiny_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "a_gradcam.npy").write_text("stale")
    code, _, err = _run(
        capsys, "explain", files["a"], "--model", f"{tiny_module}:build", "--size", "16",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a_gradcam.npy", "a_gradcam.png", "keep.txt"]
    assert np.load(out / "a_gradcam.npy").shape == (16, 16)


def test_staged_output_moves_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), staged_output(target) as stage:
        (stage / "x.txt").write_text("1")
        raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()
    assert not list(tmp_path.rglob(".camkit-*"))
    with staged_output(target) as stage:
        (stage / "x.txt").write_text("1")
    assert (target / "x.txt").read_text() == "1"


def test_random_weights_are_noted(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = _run(
        capsys, "explain", files["a"], "--model", "torchvision:resnet18", "--size", "32",
        "--layer", "layer3", "--out", tmp_path / "o",
    )  # fmt: skip
    assert code == 0 and "random weights" in err and "(random weights)" in stdout


def test_device_that_is_not_there(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = _run(
        capsys, "explain", files["a"], "--model", "torchvision:resnet18", "--device", "cuda",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert code == 1 and "CUDA is not available" in err


def test_timm_spec_uses_its_data_config(
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """timm's API as camkit uses it: is_model, create_model, data.resolve_data_config."""
    fake = types.ModuleType("timm")
    fake.is_model = lambda name: name == "tiny"  # type: ignore[attr-defined]
    fake.list_models = lambda: ["tiny"]  # type: ignore[attr-defined]
    made: dict[str, Any] = {}

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        made.update(name=name, pretrained=pretrained, **kwargs)
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        return torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    fake.create_model = create_model  # type: ignore[attr-defined]
    config = {"input_size": (3, 40, 40), "crop_pct": 0.8, "interpolation": "bicubic"}
    config |= {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2), "crop_mode": "center"}
    fake.data = types.SimpleNamespace(  # type: ignore[attr-defined]
        resolve_data_config=lambda args, model=None: config
    )
    monkeypatch.setitem(sys.modules, "timm", fake)
    torch.save(create_model("tiny").state_dict(), tmp_path / "tiny.pt")
    made.clear()
    code, stdout, err = _run(
        capsys, "explain", files["a"], "--model", "timm:tiny", "--weights", tmp_path / "tiny.pt",
        "--out", tmp_path / "o", "--json",
    )  # fmt: skip
    assert code == 0, err
    prep = json.loads(stdout)["preprocess"]
    assert (prep["size"], prep["resize"], prep["interpolation"]) == ([40, 40], 50, "bicubic")
    assert made == {"name": "tiny", "pretrained": False}
    code, _, err = _run(capsys, "explain", files["a"], "--model", "timm:tinyy")
    assert code == 1 and "unknown timm model 'tinyy'. Did you mean 'tiny'" in err


# -- methods, plugins, demo, the parser ------------------------------------------------------
def test_methods_lists_names_papers_gradients_and_cost(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, stdout, _ = _run(capsys, "methods")
    assert code == 0
    line = next(ln for ln in stdout.splitlines() if ln.startswith("gradcam "))
    assert "Selvaraju et al. 2017" in line and "yes" in line and "1 forward" in line
    assert set(camkit.list_methods()) <= {ln.split()[0] for ln in stdout.splitlines()[1:]}
    code, stdout, _ = _run(capsys, "methods", "grad*", "--json")
    rows = {r["name"]: r for r in json.loads(stdout)}
    assert "cam" not in rows and rows["gradcampp"]["aliases"] == ["gradcam++", "grad-cam++"]
    assert rows["gradcam"]["needs_gradients"] is True and "Grad-CAM" in rows["gradcam"]["paper"]


def test_plugins_prints_json_with_the_camkit_distribution(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, stdout, _ = _run(capsys, "plugins")
    assert code == 0
    plugins = {p["name"]: p for p in json.loads(stdout)}
    gradcam = plugins["gradcam"]
    assert gradcam["distribution"] == "camkit" and gradcam["version"] == camkit.__version__
    assert gradcam["hooks"] == ["register_methods"] and gradcam["methods"] == ["gradcam"]


def test_demo_calls_run_demo_and_prints_its_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict[str, Any]] = []

    def run_demo(out_dir: Path, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append({"out_dir": out_dir, **kwargs})
        return [{"method": "gradcam", "pointing": 0.9, "seconds": 0.0123}]

    monkeypatch.setattr(camkit.demo, "run_demo", run_demo, raising=False)
    code, stdout, err = _run(
        capsys, "demo", "--out", tmp_path / "d", "--methods", "gradcam,grad-cam++", "--device",
        "cpu", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert calls == [
        {
            "out_dir": tmp_path / "d",
            "methods": ["gradcam", "gradcampp"],
            "device": "cpu",
            "progress": False,
            "seed": 0,
        }
    ]
    assert "pointing" in stdout and "0.9" in stdout and f"files in {tmp_path / 'd'}" in stdout
    code, _, err = _run(capsys, "demo", "--methods", "nope")
    assert code == 1 and "unknown method 'nope'" in err and len(calls) == 1
    monkeypatch.delattr(camkit.demo, "run_demo")
    code, _, err = _run(capsys, "demo", "--out", tmp_path / "d2")
    assert code == 1 and "camkit.demo.run_demo is missing" in err


def test_parser_basics(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "--version")[1].strip() == f"camkit {camkit.__version__}"
    assert _run(capsys, "explain", "--help")[0] == 0
    code, _, err = _run(capsys)
    assert code == 2 and "explain" in err
    code, _, err = _run(capsys, "explain", "x.png")
    assert code == 2 and "camkit: error: the following arguments are required: --model" in err


def test_option_values() -> None:
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5
    assert parse_value("False") is False and parse_value("none") is None
    assert parse_value("hflip,scale") == ("hflip", "scale") and parse_value("abs") == "abs"
