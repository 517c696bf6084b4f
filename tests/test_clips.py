"""Planted-evidence clip generators: shapes, determinism, label rule, evidence, splits."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from attnlab.data.clips import DIRECTIONS, make_frame_clips, make_video_clips, split_indices


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images / 16.0, d.target


def _canvas(images, ids, positions, size, scale=2):
    """Literal reference: paste each nearest-upsampled source image at its position."""
    canvas = np.zeros((size, size))
    for i, (r, c) in zip(ids, positions):
        img = np.kron(images[i], np.ones((scale, scale)))
        h, w = img.shape
        canvas[r:r + h, c:c + w] = np.maximum(canvas[r:r + h, c:c + w], img)
    return canvas


# ---------------------------------------------------------------- frame clips

def test_frame_clips_shapes_and_dtypes():
    d = make_frame_clips(7, frames=10, size=24, n_key=2, n_distractors=3, seed=1)
    assert d["x"].shape == (7, 10, 1, 24, 24) and d["x"].dtype == torch.float32
    assert d["y"].shape == (7,) and d["y"].dtype == torch.int64
    assert d["evidence"].shape == (7, 10) and d["evidence"].dtype == torch.bool
    for key in ("digit_classes", "digit_ids"):
        assert d[key].shape == (7, 10) and d[key].dtype == torch.int64
    assert d["positions"].shape == (7, 10, 2) and d["positions"].dtype == torch.int64


def test_frame_clips_deterministic_and_seed_dependent():
    a, b = make_frame_clips(6, seed=3), make_frame_clips(6, seed=3)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c = make_frame_clips(6, seed=4)
    assert not torch.equal(a["x"], c["x"])
    assert not torch.equal(a["digit_ids"], c["digit_ids"])


@pytest.mark.parametrize("n_key,n_distractors,repeat", [(3, 4, 1), (3, None, 2), (2, 5, 1)])
def test_frame_clips_label_rule(n_key, n_distractors, repeat):
    n, frames, c = 60, 24, 10
    d = make_frame_clips(n, frames=frames, n_key=n_key, n_distractors=n_distractors,
                         distractor_repeat=repeat, seed=5)
    k = min(frames - n_key, (c - 1) * repeat) if n_distractors is None else n_distractors
    _, target = load_digits(return_X_y=True)
    for i in range(n):
        cls, ids, y = d["digit_classes"][i].numpy(), d["digit_ids"][i].numpy(), int(d["y"][i])
        counts = np.bincount(cls[cls >= 0], minlength=c)
        assert counts[y] == n_key
        assert np.all(np.delete(counts, y) <= repeat)          # y is the unique most repeated class
        assert counts.argmax() == y
        assert (cls >= 0).sum() == n_key + k
        key = cls == y
        assert np.array_equal(key, d["evidence"][i].numpy())
        assert len(set(ids[key])) == n_key                      # different source samples
        assert np.all(target[ids[cls >= 0]] == cls[cls >= 0])   # metadata names real classes


def test_frame_clips_pixels_match_metadata(digits):
    images, _ = digits
    d = make_frame_clips(8, frames=12, n_distractors=5, noise=0.0, seed=6)
    for i in range(8):
        for t in range(12):
            i_d = int(d["digit_ids"][i, t])
            ids, pos = ([i_d], [d["positions"][i, t].tolist()]) if i_d >= 0 else ([], [])
            np.testing.assert_allclose(d["x"][i, t, 0].numpy(), _canvas(images, ids, pos, 32), atol=1e-6)


def test_frame_clip_evidence_is_where_the_digits_are():
    """With distractors off and no noise, exactly the evidence frames hold pixels."""
    d = make_frame_clips(20, distractor="none", noise=0.0, seed=7)
    drawn = d["x"].flatten(2).abs().amax(-1) > 0                # [n, frames]
    assert torch.equal(drawn, d["evidence"])
    # the clip structure does not depend on the distractor mode or the noise
    full = make_frame_clips(20, distractor="digits", noise=0.3, seed=7)
    assert torch.equal(full["evidence"], d["evidence"]) and torch.equal(full["y"], d["y"])
    noise = full["x"] - make_frame_clips(20, distractor="digits", noise=0.0, seed=7)["x"]
    assert abs(noise.std().item() - 0.3) < 0.01


def test_frame_clips_noise_distractors_are_scrambled_digits(digits):
    images, _ = digits
    d = make_frame_clips(10, distractor="noise", noise=0.0, seed=8)
    blob = (d["digit_ids"] >= 0) & ~d["evidence"]
    assert torch.all(d["digit_classes"][blob] == -1) and blob.sum() == 10 * 4
    for i, t in zip(*torch.nonzero(blob, as_tuple=True)):
        r, c = d["positions"][i, t].tolist()
        patch = d["x"][i, t, 0, r:r + 16:2, c:c + 16:2].numpy()
        src = images[int(d["digit_ids"][i, t])]
        np.testing.assert_allclose(np.sort(patch.ravel()), np.sort(src.ravel()), atol=1e-6)


def test_frame_clips_train_test_use_disjoint_images():
    train = split_indices("train")
    test = split_indices("test")
    all_train, all_test = np.concatenate(train), np.concatenate(test)
    assert not set(all_train) & set(all_test)
    assert len(all_train) + len(all_test) == 1797
    a = make_frame_clips(100, split="train", seed=0)["digit_ids"]
    b = make_frame_clips(100, split="test", seed=0)["digit_ids"]
    a, b = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
    assert a <= set(all_train) and b <= set(all_test) and not a & b


def test_frame_clips_reject_bad_arguments():
    with pytest.raises(ValueError, match="distractor="):
        make_frame_clips(2, distractor="cats")
    with pytest.raises(ValueError, match="distractor_repeat="):
        make_frame_clips(2, n_key=2, distractor_repeat=2)
    with pytest.raises(ValueError, match="n_distractors="):
        make_frame_clips(2, frames=6, n_key=3, n_distractors=4)
    with pytest.raises(ValueError, match="split="):
        make_frame_clips(2, split="val")


# ---------------------------------------------------------------- video clips

def test_video_clips_shapes_and_dtypes():
    d = make_video_clips(5, frames=6, size=32, patch=8, clutter=2, seed=1)
    assert d["x"].shape == (5, 6, 1, 32, 32) and d["x"].dtype == torch.float32
    for key in ("y", "direction", "speed", "digit_ids"):
        assert d[key].shape == (5,) and d[key].dtype == torch.int64
    assert d["evidence"].shape == (5, 6, 16) and d["evidence"].dtype == torch.bool
    assert d["positions"].shape == (5, 6, 2)
    assert d["clutter_ids"].shape == (5, 2) and d["clutter_positions"].shape == (5, 2, 2)


def test_video_clips_deterministic_and_seed_dependent():
    a, b = make_video_clips(6, clutter=1, seed=3), make_video_clips(6, clutter=1, seed=3)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c = make_video_clips(6, clutter=1, seed=4)
    assert not torch.equal(a["x"], c["x"])


def test_video_motion_follows_direction_and_speed(digits):
    _, target = digits
    d = make_video_clips(50, frames=8, seed=2)
    pos = d["positions"].numpy()
    step = DIRECTIONS[d["direction"].numpy()] * d["speed"].numpy()[:, None]       # [n, 2]
    np.testing.assert_array_equal(np.diff(pos, axis=1), np.repeat(step[:, None], 7, axis=1))
    assert pos.min() >= 0 and pos.max() <= 32 - 16
    assert np.array_equal(target[d["digit_ids"].numpy()], d["y"].numpy())
    assert set(d["direction"].tolist()) <= set(range(8))


@pytest.mark.parametrize("size,patch", [(32, 8), (32, 4), (24, 8)])
def test_video_evidence_is_where_the_digit_is(digits, size, patch):
    """Independent recomputation: redraw each frame with a literal loop and mark the
    patches holding a non-zero pixel; also compare with the generator's own noise-free,
    clutter-free pixels."""
    images, _ = digits
    frames, grid = 5, size // patch
    d = make_video_clips(6, frames=frames, size=size, patch=patch, max_speed=1, noise=0.0, seed=3)
    for i in range(6):
        for f in range(frames):
            canvas = _canvas(images, [int(d["digit_ids"][i])], [d["positions"][i, f].tolist()], size)
            np.testing.assert_allclose(d["x"][i, f, 0].numpy(), canvas, atol=1e-6)
            expected = [bool(canvas[(p // grid) * patch:(p // grid + 1) * patch,
                                    (p % grid) * patch:(p % grid + 1) * patch].any())
                        for p in range(grid * grid)]
            assert d["evidence"][i, f].tolist() == expected


def test_video_clutter_leaves_digit_and_evidence_unchanged():
    plain = make_video_clips(10, clutter=0, noise=0.0, seed=4)
    clut = make_video_clips(10, clutter=3, noise=0.0, seed=4)
    for key in ("y", "direction", "speed", "positions", "evidence", "digit_ids"):
        assert torch.equal(plain[key], clut[key]), key
    assert torch.all(clut["x"] >= plain["x"])                   # digit drawn over the clutter
    for i in range(10):
        boxes = np.zeros((32, 32), dtype=bool)
        for r, c in clut["clutter_positions"][i].tolist():
            boxes[r:r + 16, c:c + 16] = True
        extra = (clut["x"][i, :, 0] - plain["x"][i, :, 0]).numpy()
        assert np.all(extra[:, ~boxes] == 0)                     # clutter only inside its boxes
        assert np.any(extra > 0)


def test_video_train_test_use_disjoint_images():
    a = make_video_clips(200, clutter=2, split="train", seed=0)
    b = make_video_clips(200, clutter=2, split="test", seed=0)
    ids_a = set(a["digit_ids"].tolist()) | set(a["clutter_ids"].flatten().tolist())
    ids_b = set(b["digit_ids"].tolist()) | set(b["clutter_ids"].flatten().tolist())
    assert not ids_a & ids_b
    assert ids_a <= set(np.concatenate(split_indices("train")).tolist())


def test_video_clips_reject_bad_arguments():
    with pytest.raises(ValueError, match="patch="):
        make_video_clips(2, size=32, patch=5)
    with pytest.raises(ValueError, match="max_speed="):
        make_video_clips(2, frames=8, size=32, max_speed=3)


@pytest.mark.parametrize("baseline", [0.0, 0.5, "mean"])
def test_frames_perturbation_on_cached_embeddings_equals_masked_clips(baseline):
    """The frames experiment's deletion test runs the encoder on cached per-frame
    embeddings; it must give the same curve as the whole model on masked clips."""
    from attnlab.config import FramesParams
    from attnlab.evaluate import deletion_curve, sequence_masker
    from attnlab.experiments import get_experiment
    from attnlab.models.frames import frames_classifier

    torch.manual_seed(0)
    model = frames_classifier(10, d_model=16, nhead=2, num_layers=2)
    model.train()
    with torch.no_grad():                        # non-trivial BatchNorm running statistics
        model(torch.rand(8, 6, 1, 16, 16) * 2 + 0.3)
    model.eval()
    clips = make_frame_clips(10, frames=6, size=16, n_key=2, n_distractors=2, seed=3)
    train = make_frame_clips(12, frames=6, size=16, n_key=2, n_distractors=2, seed=4)
    data = {"x_test": clips["x"], "x_train": train["x"]}
    cfg = FramesParams.model_validate({"explain": {"baseline": baseline}})
    exp = get_experiment("frames")
    pert = exp.perturbation(cfg, model, data, {}, exp.explained(cfg, data | {"y_test": torch.zeros(10)},
                                                                 {"n_items": 6}))
    fn, h, masker = pert.fn, pert.x, pert.masker
    assert h.shape == (10, 6, 16)
    importance = torch.rand(10, 6, generator=torch.Generator().manual_seed(5))
    fill = train["x"].mean(dim=(0, 1)) if baseline == "mean" else baseline
    expected = deletion_curve(model, clips["x"], importance, sequence_masker(fill), batch_size=4)
    got = deletion_curve(fn, h, importance, masker, batch_size=4)
    torch.testing.assert_close(got.probs, expected.probs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["frames", "video", "motion"])
def test_explain_samples_picks_evenly_spread_test_samples(kind):
    """``explain.samples: k`` explains k test samples spread over the test set (first and last
    included), with their labels, evidence and test-set indices; without it, all of them."""
    from attnlab.config import load_params
    from attnlab.experiments import get_experiment

    params = load_params("params.yaml")
    exp = get_experiment(params.kind(kind))
    n = 23
    data = {"x_test": torch.arange(n).float()[:, None, None].expand(n, 4, 3).clone(),
            "y_test": torch.arange(n) % 3, "evidence_test": torch.arange(n * 4).reshape(n, 4) % 2 == 0}
    meta = {"n_items": 4, "frames": 2, "patch": 1, "patches": 2, "size": 2, "channels": ["a", "b", "c"]}
    for k, want in ((5, [0, 6, 11, 16, 22]), (None, list(range(n))), (n + 4, list(range(n)))):
        cfg = params.experiment(kind).model_copy(update={"explain": params.experiment(kind).explain.model_copy(
            update={"samples": k})})
        ex = exp.explained(cfg, data, meta)
        assert ex.x[:, 0, 0].long().tolist() == want
        assert ex.y.tolist() == [i % 3 for i in want]
        assert torch.equal(ex.evidence, data["evidence_test"][want].flatten(1))
        assert (ex.rows is None) == (k != 5) and ("rows" in ex.saved) == (k == 5)
        if k == 5:
            assert ex.rows.tolist() == want == ex.saved["rows"].tolist()
