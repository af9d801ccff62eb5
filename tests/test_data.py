"""Data: sources, prepare (stratified split, store), feeders (sharding, segments, position)."""
import os

import h5py
import numpy as np
import pytest

from hpcjobs import cli, config
from hpcjobs.data import load_data
from hpcjobs.data.feed import Feeder, Plan, augment_params, apply_augment
from hpcjobs.data.images import to_model_image
from hpcjobs.data.sources import SourceError, open_source
from hpcjobs.data.store import SPLITS, open_store, prepare, stratified_split

from conftest import QUICKSTART


@pytest.fixture(scope="module")
def digits():
    return open_source("digits")


@pytest.mark.parametrize("source", ["digits", "lfw"])
def test_stratified_split_keeps_class_shares(source):
    s = open_source(source)
    parts = stratified_split(s.labels, 0.1, 0.2, seed=3)
    all_idx = np.concatenate([parts[k] for k in SPLITS])
    assert sorted(all_idx.tolist()) == list(range(len(s)))  # a partition
    counts = np.bincount(s.labels)
    for name, share in (("val", 0.1), ("test", 0.2)):
        got = np.bincount(s.labels[parts[name]], minlength=len(counts))
        assert np.all(np.abs(got - counts * share) <= 1), (name, got, counts * share)


def test_default_test_share_rule_of_thumb(digits):
    data = prepare(digits, None, None, 0.1, None, seed=0)
    assert len(data.splits["test"]) == pytest.approx(0.1 * len(digits), abs=10)  # 1,797 < 10,000: 10%
    lfw = prepare(open_source("lfw"), None, None, 0.1, None, seed=0)
    assert len(lfw.splits["test"]) == 40  # 200 < 1,000: 20%


def test_training_split_is_in_stratified_order(digits):
    data = prepare(digits, None, None, 0.1, 0.1, seed=0)
    labels = data.splits["train"].labels
    share = np.bincount(labels) / len(labels)
    for size in (50, 137, 400):  # any contiguous window keeps the class mix (within < 2)
        for start in range(0, len(labels) - size, 97):
            got = np.bincount(labels[start:start + size], minlength=len(share))
            assert np.all(np.abs(got - share * size) < 2), (start, size, got, share * size)


def test_store_round_trip_and_class_table(tmp_path, digits):
    out = str(tmp_path / "digits.h5")
    data = prepare(digits, (16, 16), 3, 0.1, 0.1, seed=0, out_path=out)
    assert data.image_shape == (16, 16, 3)
    with h5py.File(out) as f:
        assert f["train/images"].dtype == np.uint8
        assert set(f) == set(SPLITS)
    again = open_store(out)
    assert again.class_names == digits.class_names
    np.testing.assert_array_equal(again.splits["val"].labels, data.splits["val"].labels)
    table = again.class_table()
    assert "total" in table and str(len(again.splits["train"])) in table
    # the store's train images equal the preprocessing of the source images
    i = int(again.splits["train"].source_index[5])
    np.testing.assert_array_equal(again.splits["train"].images[5], to_model_image(digits.load(i), (16, 16), 3))
    again.close()
    data.close()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def _write_folder(tmp_path, n_per_class=6):
    from PIL import Image
    from skimage import data as skd

    root = tmp_path / "imgs"
    photos = {"cat": skd.chelsea(), "coffee": skd.coffee()}
    for name, img in photos.items():
        (root / name).mkdir(parents=True)
        for k in range(n_per_class):
            Image.fromarray(img[k * 10:k * 10 + 200, k * 5:k * 5 + 250]).save(root / name / f"{k}.png")
    (root / "cat" / "zero.png").write_bytes(b"")
    (root / "cat" / "text.jpg").write_text("this is not an image\n")
    good = (root / "coffee" / "0.png").read_bytes()
    (root / "coffee" / "truncated.png").write_bytes(good[: len(good) // 3])
    return root


def test_prepare_skips_bad_images_and_strict_fails(tmp_path, capsys):
    root = _write_folder(tmp_path)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"data:\n  source: {root}\n  image_size: [24, 24]\n  validation_split: 0.2\n"
                        f"  test_split: 0.2\n")
    out = tmp_path / "store.h5"
    assert cli.main(["prepare", str(cfg_path), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped 3 unreadable image(s)" in text
    for bad, reason in (("zero.png", "empty file"), ("text.jpg", "not an image"), ("truncated.png", "truncated")):
        assert any(bad in line and reason in line for line in text.splitlines()), (bad, text)
    data = open_store(str(out))
    assert sum(len(data.splits[s]) for s in SPLITS) == 12
    data.close()
    # strict: fails with one line naming the file, and the good store stays as it was
    before = out.read_bytes()
    assert cli.main(["prepare", str(cfg_path), "--output", str(out), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(root) in err
    assert out.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_bad_sources_are_clear(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nmissing.png,cat\n")
    with pytest.raises(SourceError, match="missing file"):
        open_source(str(listing))
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "nothing"))
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 1]),
             class_names=np.array(["a"]))
    with pytest.raises(SourceError, match="outside the 1 classes"):
        open_source(str(tmp_path / "x.npz"))
    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(SourceError, match="class 'b' has 2 sample"):
        stratified_split(labels, 0.2, 0.2, 0, ["a", "b"])


def test_listing_and_npz_sources(tmp_path):
    root = _write_folder(tmp_path, 3)
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(root.rglob("[0-9].png"))]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    s = open_source(str(tmp_path / "l.csv"))
    assert len(s) == 6 and s.class_names == ["cat", "coffee"]
    import json
    (tmp_path / "l.json").write_text(json.dumps([{"path": r.split(",")[0], "label": r.split(",")[1]}
                                                  for r in rows[1:]]))
    assert len(open_source(str(tmp_path / "l.json"))) == 6
    x = np.random.default_rng(0).integers(0, 255, (10, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 2)
    s = open_source(str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(s.load(3), x[3])


# --------------------------------------------------------------------------- feeders
@pytest.mark.parametrize("n", [1000, 1003, 997])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_sharding_covers_every_sample_once_per_pass(n, workers):
    plan = Plan(n, seed=1)
    batch = 12 * workers
    seen = []
    shares = {w: [] for w in range(workers)}
    for step in range(n // batch + 2):
        for w in range(workers):
            a, b = plan.worker_slice(step, batch, w, workers)
            idx, _ = plan.indices(a, b)
            shares[w].append(idx)
            seen.append((a, b, idx))
    stream = np.concatenate([idx for a, b, idx in sorted(seen, key=lambda t: t[0])])
    first_pass = stream[:n]
    assert sorted(first_pass.tolist()) == list(range(n))
    # disjoint shares within the pass
    owner = {}
    for a, b, idx in seen:
        for pos, i in zip(range(a, b), idx):
            if pos < n:
                assert i not in owner
                owner[i] = (a, b)


@pytest.mark.parametrize("source", ["digits", "lfw"])
def test_hybrid_segments_are_class_balanced(source):
    data = prepare(open_source(source), None, None, 0.1, 0.1, seed=0)
    train = data.splits["train"]
    per_sample = train.nbytes // len(train)
    feeder = Feeder(data, feed="hybrid", memory_budget=int(2.2 * 150 * per_sample), epochs_per_segment=3,
                    global_batch=8)
    plan = feeder.plan
    k = len(plan.segments)
    assert k == int(np.ceil(len(train) / 150)) and k > 1
    counts = np.bincount(train.labels)
    rows = np.concatenate(plan.segments)
    assert sorted(rows.tolist()) == list(range(len(train)))  # a partition of the split
    for seg in plan.segments:
        got = np.bincount(train.labels[seg], minlength=len(counts))
        assert np.all((got == counts // k) | (got == -(-counts // k))), (got, counts / k)
        # in the stratified store a segment is one narrow row range: one sequential read
        assert seg[-1] + 1 - seg[0] <= len(seg) + 4 * len(counts)
    sizes = [len(s) for s in plan.segments]
    assert max(sizes) - min(sizes) <= 1
    # each segment is fed for epochs_per_segment passes, each pass a fresh permutation of it
    for p in range(2 * 3):
        assert sorted(plan.permutation(p).tolist()) == sorted(plan.segments[p // 3].tolist())
    assert not np.array_equal(plan.permutation(0), plan.permutation(1))


@pytest.mark.parametrize("feed", ["memory", "disk", "hybrid"])
def test_resumed_feeder_sees_the_same_batches(tmp_path, feed):
    data = prepare(open_source("digits"), None, None, 0.1, 0.1, seed=0, out_path=str(tmp_path / "d.h5"))
    aug = config.AugmentConfig(flip_horizontal=True, rotation=10, zoom=0.1)
    kw = dict(feed=feed, memory_budget=2 * 400 * 64, epochs_per_segment=2, seed=5, augment=aug, global_batch=64)
    a = Feeder(data, **kw).batches(0)
    full = [next(a) for _ in range(60)]  # crosses several segments and passes
    b = Feeder(data, **kw).batches(37)
    for k in range(37, 60):
        x, y, p = next(b)
        np.testing.assert_array_equal(x, full[k][0])
        np.testing.assert_array_equal(y, full[k][1])
        np.testing.assert_array_equal(p, full[k][2])
    pos = Feeder(data, **kw).plan.position(37, 64)
    assert set(pos) >= {"segment", "epoch_in_segment", "pass_number", "offset_in_pass"}
    data.close()


def test_feeds_give_identical_streams(tmp_path):
    data = prepare(open_source("digits"), None, None, 0.1, 0.1, seed=0, out_path=str(tmp_path / "d.h5"))
    streams = {}
    for feed in ("memory", "disk"):
        g = Feeder(data, feed=feed, global_batch=50, seed=2).batches(0)
        streams[feed] = [next(g) for _ in range(30)]
    for (xa, ya, _), (xb, yb, _) in zip(streams["memory"], streams["disk"]):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    data.close()


def test_worker_streams_union_equals_single_stream():
    data = prepare(open_source("digits"), None, None, 0.1, 0.1, seed=0)
    single = Feeder(data, global_batch=60, seed=4).batches(0)
    parts = [Feeder(data, global_batch=60, seed=4, worker=w, workers=3).batches(0) for w in range(3)]
    for _ in range(10):
        x, y, _ = next(single)
        got = [next(p) for p in parts]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), x)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), y)


def test_augment_params_depend_only_on_position():
    whole = augment_params(9, 100, 40)
    np.testing.assert_array_equal(whole[10:20], augment_params(9, 110, 10))
    assert not np.array_equal(augment_params(9, 0, 5), augment_params(10, 0, 5))


def test_augmentation_same_eager_and_in_tf_data():
    import tensorflow as tf

    data = prepare(open_source("digits"), None, None, 0.1, 0.1, seed=0)
    x = data.splits["train"].images[:16].astype(np.float32)
    p = augment_params(1, 0, 16)
    aug = config.AugmentConfig(flip_horizontal=True, rotation=20, shift=0.1, zoom=0.2, brightness=0.1,
                               contrast=0.2)
    eager = apply_augment(tf.constant(x), tf.constant(p), aug).numpy()
    ds = tf.data.Dataset.from_tensors((x, p)).map(lambda a, b: apply_augment(a, b, aug))
    graph = next(iter(ds)).numpy()
    np.testing.assert_allclose(eager, graph, atol=1e-4)
    assert eager.shape == x.shape and not np.allclose(eager, x)
    assert eager.min() >= 0 and eager.max() <= 255


def test_load_data_from_config():
    cfg = config.load(QUICKSTART)
    data = load_data(cfg)
    assert data.image_shape == (8, 8, 1) and data.num_classes == 10
    assert sum(len(data.splits[s]) for s in SPLITS) == 1797


# --------------------------------------------------------------------------- hostile inputs to prepare (issue 17)
def _sha(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _prepare(capsys, *argv):
    code = cli.main(["prepare", *map(str, argv)])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    if code != 0:  # the progress lines, then one line saying what is wrong
        lines = [line for line in out.err.strip().splitlines() if not line.startswith("prepare: ")]
        assert len(lines) == 1 and lines[0].startswith("hpcjobs: "), out.err
    return code, out


def _npz_config(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "src.npz", images=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), labels=np.arange(40) % 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: {tmp_path / 'src.npz'}\n")
    return cfg


def test_prepare_never_replaces_its_source_or_a_file_that_is_not_a_store(tmp_path, capsys):
    cfg = _npz_config(tmp_path)
    src, before = tmp_path / "src.npz", _sha(tmp_path / "src.npz")
    code, out = _prepare(capsys, cfg, "--output", src)
    assert code == 2 and "is the source being prepared" in out.err and "--force" in out.err
    assert _sha(src) == before
    link = tmp_path / "link.h5"
    link.symlink_to(src)  # the same file under another name
    assert _prepare(capsys, cfg, "--output", link)[0] == 2 and _sha(src) == before
    other, kept = tmp_path / "notes.yaml", _sha(cfg)
    code, out = _prepare(capsys, cfg, "--output", cfg)
    assert code == 2 and "exists and is not an hpcjobs store" in out.err and _sha(cfg) == kept
    assert _prepare(capsys, cfg, "--output", tmp_path)[0] == 2  # a folder
    # an existing store is ours to replace; --force replaces anything but a folder
    store = tmp_path / "s.h5"
    assert _prepare(capsys, cfg, "--output", store)[0] == 0
    assert _prepare(capsys, cfg, "--output", store)[0] == 0
    other.write_text("keep: me\n")
    assert _prepare(capsys, cfg, "--output", other, "--force")[0] == 0
    open_store(str(other)).close()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_a_listed_image_is_never_the_output(tmp_path, capsys):
    root = _write_folder(tmp_path, 3)
    image = root / "cat" / "0.png"
    before = _sha(image)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: {root}\n  image_size: [16, 16]\n  validation_split: 0\n  test_split: 0.3\n")
    code, out = _prepare(capsys, cfg, "--output", image)
    assert code == 2 and "is the source being prepared" in out.err and _sha(image) == before


def test_the_store_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    from hpcjobs.data import store as store_mod

    synced = []
    real = store_mod.fsync_file
    monkeypatch.setattr(store_mod, "fsync_file", lambda p: (synced.append((p, os.path.exists(p))), real(p)))
    out = tmp_path / "d.h5"
    prepare(open_source("digits"), None, None, 0.1, 0.1, seed=0, out_path=str(out)).close()
    assert synced == [(f"{out}.partial/store.h5.tmp", True)]  # the temporary file goes with the chunks


def test_a_failed_write_is_one_line_exit_1_and_keeps_the_old_store(tmp_path, capsys, monkeypatch):
    import errno

    from hpcjobs.data import store as store_mod

    cfg = _npz_config(tmp_path)
    out = tmp_path / "s.h5"
    assert _prepare(capsys, cfg, "--output", out)[0] == 0
    before = _sha(out)

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "fsync_file", full)
    code, res = _prepare(capsys, cfg, "--output", out)
    assert code == 1 and "writing the store failed (No space left on device)" in res.err
    assert _sha(out) == before and not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_output_under_a_file_is_one_line(tmp_path, capsys):
    cfg = _npz_config(tmp_path)
    code, out = _prepare(capsys, cfg, "--output", cfg / "sub" / "s.h5")
    assert code == 2 and f"cannot write the store there ({cfg} is a file)" in out.err


def _bomb_png(path, side=100_000):
    """A PNG whose header claims side x side pixels (10^10): PIL's DecompressionBombError."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _class_folders(root, layout):
    from PIL import Image

    for name, n in layout.items():
        (root / name).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(root / name / f"{k}.png")
    return root


def test_a_decompression_bomb_is_skipped_and_strict_fails(tmp_path, capsys):
    root = _class_folders(tmp_path / "imgs", {"cat": 4, "coffee": 4})
    _bomb_png(root / "coffee" / "bomb.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: {root}\n  image_size: [16, 16]\n  validation_split: 0\n  test_split: 0.3\n")
    code, out = _prepare(capsys, cfg, "--output", tmp_path / "s.h5")
    assert code == 0
    assert any("bomb.png" in line and "decompression bomb" in line for line in out.out.splitlines()), out.out
    code, out = _prepare(capsys, cfg, "--output", tmp_path / "strict.h5", "--strict")
    assert code == 2 and "bomb.png: refused as a decompression bomb" in out.err
    assert not (tmp_path / "strict.h5").exists()


@pytest.mark.parametrize("layout, words", [
    ({"cat": 4}, "only one class folder (cat); a classifier needs two or more"),
    ({"cat": 4, "coffee": 4, "dog": 0}, "dog: an empty class folder (no images)"),
])
def test_one_class_or_an_empty_class_folder_is_exit_2_naming_the_folder(tmp_path, capsys, layout, words):
    root = _class_folders(tmp_path / "classes", layout)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: {root}\n")
    code, out = _prepare(capsys, cfg, "--output", tmp_path / "s.h5")
    assert code == 2 and words in out.err and str(root) in out.err


# --------------------------------------------------------------------------- the training pipeline
@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    data = prepare(open_source("digits"), None, None, 0.1, 0.1, seed=0,
                   out_path=str(tmp_path_factory.mktemp("store") / "d.h5"))
    yield data
    data.close()


def _pipeline_equals_reference(feeder, start, steps):
    """train_dataset (tf ops on resident rows) gives exactly batches() (numpy, per batch)."""
    import tensorflow as tf

    ref, got = feeder.batches(start), iter(feeder.train_dataset(start))
    for _ in range(steps * feeder.local_replicas):
        x, y, p = next(ref)
        tx, ty = next(got)
        want = tf.cast(x, tf.float32)
        if feeder.augment.enabled:
            want = apply_augment(want, tf.constant(p), feeder.augment)
        np.testing.assert_array_equal(ty.numpy(), y)
        np.testing.assert_allclose(tx.numpy(), want.numpy(), atol=1e-4)


@pytest.mark.parametrize("feed", ["memory", "disk", "hybrid"])
@pytest.mark.parametrize("layout", [dict(), dict(workers=3, worker=2), dict(local_replicas=2), dict(start=37)])
def test_training_pipeline_equals_the_reference_stream(digits_store, feed, layout):
    layout = dict(layout)
    start = layout.pop("start", 0)
    aug = config.AugmentConfig(flip_horizontal=True, rotation=10, zoom=0.1)
    feeder = Feeder(digits_store, feed=feed, memory_budget=2 * 400 * 64, epochs_per_segment=2, seed=5,
                    augment=aug, global_batch=48, **layout)
    _pipeline_equals_reference(feeder, start, 70)  # several segments, windows and passes


def test_training_pipeline_from_memory_arrays():
    data = prepare(open_source("digits"), None, None, 0.1, 0.1, seed=0)  # no store: numpy arrays
    for feed in ("memory", "hybrid", "disk"):
        _pipeline_equals_reference(Feeder(data, feed=feed, memory_budget=30000, global_batch=32, seed=1), 3, 60)


def test_batches_that_straddle_more_than_two_segments(digits_store):
    # segments of ~9 samples: one batch of 32 spans four of them
    feeder = Feeder(digits_store, feed="hybrid", memory_budget=int(2.2 * 9 * 64), global_batch=32, seed=2)
    assert len(feeder.plan.segments) > 100
    _pipeline_equals_reference(feeder, 11, 20)


def test_python_runs_per_group_of_batches_not_per_batch(digits_store):
    for feed, most in (("memory", 0.05), ("hybrid", 0.3), ("disk", 0.5)):
        feeder = Feeder(digits_store, feed=feed, memory_budget=2 * 400 * 64, epochs_per_segment=2, global_batch=64)
        calls = []
        groups = feeder._groups

        def counted(start, groups=groups):
            for g in groups(start):
                calls.append(1)
                yield g

        feeder._groups = counted
        it = iter(feeder.train_dataset())
        for _ in range(200):
            next(it)
        assert len(calls) <= most * 200 + 2, (feed, len(calls))
        del it


def test_disk_order_is_block_shuffled_windows(digits_store):
    feeder = Feeder(digits_store, feed="disk", memory_budget=2 * 400 * 64, seed=3, global_batch=64)
    plan = feeder.plan
    n = len(digits_store.splits["train"])
    assert plan.windows > 2 and plan.block > 1 and plan.window >= 8
    perms = [plan.permutation(p) for p in range(3)]
    for perm in perms:
        assert sorted(perm.tolist()) == list(range(n))  # every pass sees every sample once
    assert not np.array_equal(perms[0], perms[1])
    idx, keys = plan.indices(n, 2 * n)  # pass 1
    for key in np.unique(keys):
        rows = idx[keys == key]
        blocks = np.unique(rows // plan.block)
        assert len(blocks) <= plan.window  # a window is a few whole blocks...
        assert set(rows.tolist()) == {r for lo, hi in plan.ranges(int(key)) for r in range(lo, hi)}
        assert not np.array_equal(rows, np.sort(rows))  # ...shuffled inside
    pos = plan.position(40, 64)
    assert {"window", "pass_number"} <= set(pos)
    # a window as large as the split: a full shuffle, the memory feeder's order
    big = Feeder(digits_store, feed="disk", seed=3, global_batch=64).plan
    np.testing.assert_array_equal(big.permutation(4), Feeder(digits_store, feed="memory", seed=3).plan.permutation(4))


@pytest.mark.parametrize("feed", ["disk", "hybrid"])
def test_worker_shards_are_exactly_once_for_block_feeds(digits_store, feed):
    kw = dict(feed=feed, memory_budget=2 * 400 * 64, epochs_per_segment=2, seed=4, global_batch=60)
    single = Feeder(digits_store, **kw).batches(0)
    parts = [Feeder(digits_store, worker=w, workers=3, **kw).batches(0) for w in range(3)]
    n = len(digits_store.splits["train"])
    seen = []
    for _ in range(n // 60):
        x, y, _ = next(single)
        got = [next(p) for p in parts]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), x)
        seen.append(Feeder(digits_store, **kw).plan.indices(len(seen) * 60, len(seen) * 60 + 60)[0])
    if feed == "disk":  # one pass: no sample twice
        flat = np.concatenate(seen)
        assert len(np.unique(flat)) == len(flat)


def test_row_reader_reads_raw_chunks_contiguous_and_filtered_datasets(tmp_path, digits_store):
    from hpcjobs.data.rows import RowReader

    train = digits_store.splits["train"]
    reader = RowReader(train.images, digits_store.path)
    assert reader.extents is not None  # unfiltered chunks: read with os.preadv
    ranges = [(0, 3), (250, 530), (len(train) - 7, len(train))]
    want = np.concatenate([train.images[lo:hi] for lo, hi in ranges])
    for _ in range(2):  # the second read reuses the first's buffer
        got = reader.read(ranges)
        np.testing.assert_array_equal(got, want)
        assert got.ctypes.data % 64 == 0
        del got
    kept = reader.read([(10, 20)])
    np.testing.assert_array_equal(reader.read([(20, 30)]), train.images[20:30])
    np.testing.assert_array_equal(kept, train.images[10:20])  # a buffer in use is not handed out again
    path = str(tmp_path / "other.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("contiguous", data=train.images[...])
        f.create_dataset("gzip", data=train.images[...], chunks=(64, 8, 8, 1), compression="gzip")
    with h5py.File(path, "r") as f:
        for name, raw in (("contiguous", True), ("gzip", False)):
            reader = RowReader(f[name], path)
            assert (reader.extents is not None) == raw
            np.testing.assert_array_equal(reader.read(ranges), want)
    np.testing.assert_array_equal(RowReader(train.images[...]).read(ranges), want)
    view = RowReader(train.images, digits_store.path).view(250, 530)  # prepare aligns the chunks
    assert view is not None and not view.flags.writeable
    np.testing.assert_array_equal(view, train.images[250:530])


def test_hybrid_reads_the_segments_it_cannot_map(digits_store, tmp_path):
    # rows of 25 bytes: most segments start off a 64-byte boundary, so they are read
    data = prepare(open_source("digits"), (5, 5), 1, 0.1, 0.1, seed=0, out_path=str(tmp_path / "odd.h5"))
    feeder = Feeder(data, feed="hybrid", memory_budget=2 * 400 * 25, epochs_per_segment=2, seed=5, global_batch=48)
    mapped = [feeder.reader.view(*feeder.plan.ranges(k)[0]) is not None for k in range(len(feeder.plan.segments))]
    assert not all(mapped)
    _pipeline_equals_reference(feeder, 5, 60)
    data.close()
    never = Feeder(digits_store, feed="hybrid", memory_budget=2 * 400 * 64, epochs_per_segment=2, seed=5,
                   global_batch=48)
    never.reader.view = lambda lo, hi: None
    _pipeline_equals_reference(never, 0, 60)


def test_parallel_calls_follow_the_jobs_cpus(digits_store):
    from hpcjobs.cluster import info as cluster

    allowed = len(os.sched_getaffinity(0))
    assert cluster.cpu_count({}) == allowed
    assert cluster.cpu_count({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert cluster.cpu_count({"SLURM_CPUS_PER_TASK": "4096"}) == allowed  # never more than the mask
    info = cluster.detect({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1", "HPCJOBS_NO_SQUEUE": "1"})
    assert info.cpus == 1
    assert Feeder(digits_store).cpus == allowed
    feeder = Feeder(digits_store, feed="hybrid", memory_budget=30000, cpus=1, global_batch=32)
    _pipeline_equals_reference(feeder, 0, 30)


def test_prefetch_to_a_device_inside_a_compiled_loop(tmp_path):
    # two logical CPUs stand in for host and GPU; a fresh process, as they must be set first
    script = tmp_path / "device.py"
    script.write_text('''
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from hpcjobs.data.feed import Feeder
from hpcjobs.data.sources import open_source
from hpcjobs.data.store import prepare
data = prepare(open_source("digits"), None, None, 0.1, 0.1, seed=0)
kw = dict(feed="hybrid", memory_budget=30000, global_batch=32, seed=3)
it = iter(Feeder(data, device="/CPU:1", **kw).train_dataset(5))
assert next(it)[0].device.endswith("CPU:1")
@tf.function
def total(it, n):
    s = tf.constant(0.0, tf.float64)
    for _ in tf.range(n):
        x, y = next(it)
        s += tf.reduce_sum(tf.cast(x, tf.float64)) + tf.cast(tf.reduce_sum(y), tf.float64)
    return s
ref = Feeder(data, **kw).batches(6)
want = sum(float(x.astype(np.float64).sum()) + float(y.sum()) for x, y, _ in (next(ref) for _ in range(40)))
assert float(total(it, tf.constant(40))) == want
del it  # a tf.data iterator over a generator still alive at interpreter exit can hang it
print("ok")
''')
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO))
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_prefetch_to_the_gpu(digits_store):
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        pytest.skip("no GPU: prefetching onto one is tested where there is one")
    x, _ = next(iter(Feeder(digits_store, device="gpu", global_batch=32).train_dataset()))
    assert "GPU" in x.device
