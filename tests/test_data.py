import numpy as np
import pytest
import torch
from PIL import Image

from slimkit import SlimkitError, calibration_subset, load_data, make_loader
from slimkit.data.augment import random_shift


def test_digits_split_sizes_stratified_and_normalized(digits):
    assert digits.input_shape == (1, 8, 8)
    assert (len(digits.y_train), len(digits.y_val), len(digits.y_test)) == (1078, 359, 360)
    assert digits.num_classes == 10
    # stratified: every class share within 1 sample of the dataset's share in each split
    full = np.bincount(np.concatenate([digits.y_train, digits.y_val, digits.y_test]))
    for y in (digits.y_train, digits.y_val, digits.y_test):
        expected = full * len(y) / full.sum()
        assert np.abs(np.bincount(y.numpy(), minlength=10) - expected).max() <= 1.0
    assert abs(float(digits.x_train.mean())) < 1e-5
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-3


def test_digits_split_is_deterministic_and_disjoint(digits):
    again = load_data("digits")
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_train, digits.y_train)
    rows = {tuple(r) for r in digits.x_train.flatten(1).tolist()}
    # some digits images are exact duplicates in the source data; almost all test rows are unseen
    overlap = sum(tuple(r) in rows for r in digits.x_test.flatten(1).tolist())
    assert overlap <= 3


def test_calibration_subset_is_seeded_and_from_train(digits):
    a = calibration_subset(digits, 32, seed=1)
    assert a.shape == (32, 1, 8, 8)
    assert torch.equal(a, calibration_subset(digits, 32, seed=1))
    assert not torch.equal(a, calibration_subset(digits, 32, seed=2))
    train_rows = {tuple(r) for r in digits.x_train.flatten(1).tolist()}
    assert all(tuple(r) in train_rows for r in a.flatten(1).tolist())


def test_npz_with_explicit_splits(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.normal(size=(n, 3, 4, 4)).astype(np.float32) for s, n in (("train", 20), ("val", 6), ("test", 7))}
    arrays.update({f"y_{s}": rng.integers(0, 3, size=len(arrays[f"x_{s}"])) for s in ("train", "val", "test")})
    np.savez(tmp_path / "d.npz", **arrays)
    splits = load_data(tmp_path / "d.npz")
    assert splits.input_shape == (3, 4, 4)
    assert torch.equal(splits.x_test, torch.from_numpy(arrays["x_test"]))
    assert torch.equal(splits.y_val, torch.from_numpy(arrays["y_val"]))


def test_npz_with_x_y_is_split_60_20_20(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(100, 16)), y=np.repeat(np.arange(4), 25))
    splits = load_data(tmp_path / "d.npz")
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (60, 20, 20)
    assert splits.input_shape == (1, 1, 16)


def test_npz_missing_y_test_names_it(tmp_path):
    arrays = {k: np.zeros((4, 8, 8)) if k.startswith("x") else np.zeros(4, dtype=np.int64)
              for k in ("x_train", "y_train", "x_val", "y_val", "x_test")}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SlimkitError, match=r"bad\.npz: missing y_test"):
        load_data(tmp_path / "bad.npz")


@pytest.mark.parametrize("payload, message", [
    ({"x": np.zeros((10, 4)), "y": np.zeros(9, dtype=np.int64)}, "x has 10 samples but y has 9"),
    ({"x": np.zeros((12, 4)), "y": np.zeros(12)}, "1-D integer array"),
    ({"x": np.full((12, 4), np.nan), "y": np.arange(12) % 3}, "NaN or Inf"),
    ({"a": np.zeros(3)}, "expected arrays"),
])
def test_malformed_npz_errors(tmp_path, payload, message):
    np.savez(tmp_path / "bad.npz", **payload)
    with pytest.raises(SlimkitError, match=message):
        load_data(tmp_path / "bad.npz")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 12, dtype=object), y=np.arange(12))
    with pytest.raises(SlimkitError, match="object arrays are refused"):
        load_data(tmp_path / "obj.npz")


def test_unknown_data_spec():
    with pytest.raises(SlimkitError, match="expected 'digits'"):
        load_data("mnist")


def _write_images(root, classes=3, per_class=5, size=(6, 6)):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, size=size, dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")


def test_image_folder(tmp_path):
    _write_images(tmp_path / "imgs")
    splits = load_data(tmp_path / "imgs")
    assert splits.input_shape == (1, 6, 6)
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 15
    assert set(splits.y_train.tolist()) == {0, 1, 2}


def test_image_folder_with_mixed_sizes_and_corrupt_files(tmp_path):
    _write_images(tmp_path / "a")
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8)).save(tmp_path / "a" / "class1" / "z.png")
    with pytest.raises(SlimkitError, match="z.png: image is 7x5"):
        load_data(tmp_path / "a")
    _write_images(tmp_path / "b")
    (tmp_path / "b" / "class0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SlimkitError, match="broken.png: not a readable image"):
        load_data(tmp_path / "b")


def test_random_shift_moves_content_by_at_most_one_pixel():
    x = torch.zeros(50, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    torch.manual_seed(0)
    y = random_shift(x)
    positions = {tuple(torch.nonzero(img[0])[0].tolist()) for img in y}
    assert positions <= {(r, c) for r in (3, 4, 5) for c in (3, 4, 5)}
    assert len(positions) > 3
    assert torch.equal(y.sum(dim=(1, 2, 3)), torch.ones(50))


def test_loader_shuffle_is_seeded(digits):
    a = [y for _, y in make_loader(digits, "train", 64, shuffle=True, seed=3)]
    b = [y for _, y in make_loader(digits, "train", 64, shuffle=True, seed=3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_iterating_a_loader_leaves_the_global_rng_alone(digits):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for which, shuffle in (("val", False), ("train", True)):
        for _ in make_loader(digits, which, 256, shuffle=shuffle):
            pass
    assert torch.equal(torch.get_rng_state(), before)
