"""The demo's VFM stand-in (reglue.encoders.toy_vfm): its [CLS] token and local maps separate the toy classes on images
it never saw, it is saved as a .safetensors file marked as a stand-in, and load_vfm("tiny-dinov2", weights=FILE) gives
back the same features; a bad file fails in one line; without a file the random stand-in is unchanged."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import script, toy_images
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reglue import presets
from reglue.encoders.loading import ModelLoadError
from reglue.encoders.toy_vfm import LOCAL_LAYERS, STAND_IN_NOTE, ToyVFMSettings, save_toy_vfm, train_toy_vfm
from reglue.encoders.vfm import TINY_VFM, VFM_ENV, build_tiny_vfm, load_vfm

SETTINGS = ToyVFMSettings(steps=600)  # the demo: 1000 steps on its 40 images a class


def _stand_in_note(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("reglue_stand_in")


def _features(vfm, images: np.ndarray):
    return vfm(torch.from_numpy(images).permute(0, 3, 1, 2), list(LOCAL_LAYERS))


def _centroid_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray) -> float:
    """Nearest-class-centroid accuracy on ``test`` of centroids fitted on ``train`` (float64 NumPy)."""
    train, test = train.astype(np.float64), test.astype(np.float64)
    centroids = np.stack([train[train_labels == k].mean(axis=0) for k in np.unique(train_labels)])
    nearest = ((test[:, None] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    return float(np.mean(nearest == test_labels))


def _held_out_accuracies(vfm, train, test) -> tuple[float, float]:
    """([CLS], mean-pooled local maps) centroid accuracies on held-out images."""
    fit, held = _features(vfm, train[0]), _features(vfm, test[0])
    cls = _centroid_accuracy(fit.cls.numpy(), train[1], held.cls.numpy(), test[1])
    local = _centroid_accuracy(fit.local.mean(dim=(2, 3)).numpy(), train[1], held.local.mean(dim=(2, 3)).numpy(),
                               test[1])
    return cls, local


@pytest.fixture(scope="module")
def trained():
    train = toy_images(per_class=60, seed=0)
    return train, train_toy_vfm(*train, SETTINGS)


def test_the_local_blocks_are_the_tiny_presets():
    for name in ("tiny-reglue", "compressor-tiny"):
        config = presets.load(name)
        assert config.vfm.name == TINY_VFM and tuple(config.vfm.layers) == LOCAL_LAYERS, name


def test_its_features_separate_held_out_classes_where_the_random_ones_cannot(trained):
    train, vfm = trained
    assert not vfm.vit.training and not any(p.requires_grad for p in vfm.parameters()) and not vfm.comparable
    test = toy_images(per_class=20, seed=1)
    ours, random = _held_out_accuracies(vfm, train, test), _held_out_accuracies(build_tiny_vfm(), train, test)
    # measured: trained about 0.78 for both, random about 0.28 (colour only: chance on the 5 shapes)
    assert min(ours) > 0.6 and max(random) < 0.4, (ours, random)


def test_training_is_deterministic_for_a_seed():
    images, labels = toy_images(per_class=2, seed=2)
    settings = ToyVFMSettings(steps=3, batch=8)
    one, two = (train_toy_vfm(images, labels, settings).vit.state_dict() for _ in range(2))
    assert all(torch.equal(one[k], two[k]) for k in one)
    other = train_toy_vfm(images, labels, ToyVFMSettings(steps=3, batch=8, seed=1)).vit.state_dict()
    assert not torch.equal(one["pos_embed"], other["pos_embed"])


def test_it_is_saved_as_safetensors_marked_and_loaded_by_load_vfm(trained, tmp_path):
    (train_images, _), vfm = trained
    path = save_toy_vfm(vfm, tmp_path / "toy_vfm.safetensors")
    assert _stand_in_note(path) == STAND_IN_NOTE and "not DINOv2" in STAND_IN_NOTE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_vfm.safetensors"]  # no temporary left
    loaded = load_vfm(TINY_VFM, 56, weights=str(path))
    assert (loaded.name, loaded.image_size, loaded.comparable, loaded.vit.training) == (TINY_VFM, 56, False, False)
    images = train_images[::37]
    for ours, theirs in zip(_features(loaded, images), _features(vfm, images)):
        assert torch.equal(ours, theirs)
    # at another size: loaded at the file's grid, then the position table resampled as build_tiny_vfm does
    resized = copy.deepcopy(vfm.vit)
    resized.set_input_size(img_size=112)
    big = load_vfm(TINY_VFM, 112, weights=str(path))
    assert all(torch.equal(v, resized.state_dict()[k]) for k, v in big.vit.state_dict().items())
    # a file saved at 112 loads at its own grid: the same model back, or resampled to 56
    path_112 = save_toy_vfm(big, tmp_path / "toy_vfm_112.safetensors")
    again = load_vfm(TINY_VFM, 112, weights=str(path_112))
    assert all(torch.equal(v, big.vit.state_dict()[k]) for k, v in again.vit.state_dict().items())
    assert load_vfm(TINY_VFM, 56, weights=str(path_112)).vit.pos_embed.shape == (1, 16, 32)


def test_without_weights_the_random_stand_in_is_unchanged(monkeypatch, tmp_path):
    monkeypatch.setenv(VFM_ENV, str(tmp_path / "dinov2-b-reg.safetensors"))  # the real VFM's file: not for tiny
    for size in (56, 112):
        ours, reference = load_vfm(TINY_VFM, size).vit.state_dict(), build_tiny_vfm(size).vit.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in ours.items())
    images = toy_images(per_class=1, seed=3)[0]
    torch.manual_seed(0)  # the stand-in's weights do not depend on the global seed
    first = _features(load_vfm(TINY_VFM, 56), images)
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(first, _features(build_tiny_vfm(), images)))


def _one_line_error(path: Path, match: str):
    with pytest.raises(ModelLoadError) as info:
        load_vfm(TINY_VFM, 56, weights=str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and match in message, message


def test_bad_files_fail_in_one_line_naming_the_file(trained, tmp_path):
    _, vfm = trained
    good = save_toy_vfm(vfm, tmp_path / "good.safetensors").read_bytes()
    _one_line_error(tmp_path / "absent.safetensors", "no such file")
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    _one_line_error(tmp_path / "truncated.safetensors", "cannot load VFM tiny-dinov2")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    _one_line_error(tmp_path / "garbage.safetensors", "cannot load VFM tiny-dinov2")
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    _one_line_error(tmp_path / "garbage.pt", "cannot load VFM tiny-dinov2")
    state = load_file(str(tmp_path / "good.safetensors"))
    wide = {**state, "cls_token": torch.zeros(1, 1, 48)}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    _one_line_error(tmp_path / "wide.safetensors", "cls_token is [1, 1, 48], expected [1, 1, 32]")
    save_file({k: v for k, v in state.items() if k != "norm.weight"}, str(tmp_path / "short.safetensors"))
    _one_line_error(tmp_path / "short.safetensors", "missing norm.weight")
    save_file({**state, "pos_embed": torch.zeros(1, 15, 32)}, str(tmp_path / "grid.safetensors"))
    _one_line_error(tmp_path / "grid.safetensors", "not a square grid")


def test_the_script_trains_saves_and_reuses(tmp_path, capsys, monkeypatch):
    toy_vfm = script("toy_vfm")
    images, labels = toy_images(per_class=1, seed=4)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "imgs" / f"c{9 - label}"  # folder names sorted the other way round from draw order
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    read, read_labels, classes = toy_vfm.read_images(tmp_path / "imgs")
    assert classes == tuple(f"c{k}" for k in range(10)) and list(read_labels) == list(range(10))
    assert np.array_equal(read, images[::-1])  # label k = sorted folder k, as `reglue encode` assigns
    out = tmp_path / "vfm.safetensors"
    for expected in ("held-in nearest-centroid accuracy", "already trained"):
        monkeypatch.setattr("sys.argv", ["toy_vfm.py", str(tmp_path / "imgs"), str(out), "--steps", "2"])
        toy_vfm.main()
        assert expected in capsys.readouterr().out
    assert _stand_in_note(out) == STAND_IN_NOTE
    (tmp_path / "empty" / "c0").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        toy_vfm.read_images(tmp_path / "empty")
    assert info.value.code == 2 and "no images found" in capsys.readouterr().err
