"""The input pipeline (alphanet_jax.data): digits build, readers, determinism, resume, hosts, eval.

Datasets are tiny and built once per session: the bundled digits (ArrayRecord and TFRecord) and a
fake `imagenet2012` prepared by TFDS's own builder from a fake manual download (3 classes x 4
train JPEGs, one of them corrupt, and 5 validation JPEGs).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import collections  # noqa: E402
import hashlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from alphanet_jax import data  # noqa: E402
from alphanet_jax.data import digits_builder  # noqa: E402
from alphanet_jax.data import transforms  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import test_data_fakes as fakes  # noqa: E402  pylint: disable=g-import-not-at-top

# A small share of the 2 cores: other suites run beside this one.
INPUT = dict(threads=2, prefetch=1)
NO_AUGMENT = dict(crop="none", flip=False, autoaugment=None)


def _config(dataset, data_dir, image_size, augment=None, **inputs):
  return ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=str(data_dir), image_size=image_size,
      augment=dict(augment or {}), input={**INPUT, **inputs}))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("digits_ar")


@pytest.fixture(scope="session")
def digits_config(digits_dir):
  return _config("alphanet_digits", digits_dir, 32)


@pytest.fixture(scope="session")
def digits_tfrecord_config(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("digits_tfr")
  digits_builder.build(str(data_dir), file_format="tfrecord")
  return _config("alphanet_digits", data_dir, 32)


@pytest.fixture(scope="session")
def imagenet_config(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("imagenet")
  fakes.build_imagenet(str(data_dir), num_classes=3, per_class=4, num_val=5,
                       corrupt_train=((1, 2),))
  # 64-pixel crops keep the tests fast; test_train_batch_shapes_dtypes_ranges also runs 224.
  return _config("imagenet2012", data_dir, 64)


def _with(config, augment=None, **inputs):
  config = ml_collections.ConfigDict(config.to_dict())
  config.augment.update(augment or {})
  config.input.update(inputs)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _digest(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The bundled digits dataset.
# ---------------------------------------------------------------------------------------------


def test_digits_builds_on_first_use(digits_config):
  info = data.dataset_info(digits_config)
  assert info == {"num_classes": 10, "train_split": "train", "eval_split": "test",
                  "num_train": 1438, "num_eval": 359, "image_size": 32}
  assert data.num_examples(digits_config, "test") == 359
  built = os.path.join(digits_config.data_dir, "alphanet_digits", "1.0.0")
  assert any("array_record" in f for f in os.listdir(built))


def test_digits_split_is_fixed_stratified_and_disjoint():
  _, labels = digits_builder.digits_images_and_labels()
  train, test = digits_builder.stratified_split(labels)
  assert len(train) == 1438 and len(test) == 359
  assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
  for c in range(10):
    # Each class keeps round(20%) of its images in test.
    assert np.sum(labels[test] == c) == round(0.2 * np.sum(labels == c))
  again_train, _ = digits_builder.stratified_split(labels)
  np.testing.assert_array_equal(train, again_train)


def test_digits_images_are_upsampled_grey_rgb():
  images, labels = digits_builder.digits_images_and_labels()
  assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (1797,) and set(labels) == set(range(10))
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  grey = datasets.load_digits().images * 255.0 / 16.0
  # Linear interpolation at pixel centres: out = round(R grey R^T), R[i, j] = tent(src_i - j)
  # with src_i = (i + 0.5) / 4 - 0.5 clamped to the 8 input pixels.
  src = np.clip((np.arange(32) + 0.5) / 4 - 0.5, 0, 7)
  tent = np.maximum(0, 1 - np.abs(src[:, None] - np.arange(8)[None, :]))
  expected = np.floor(np.einsum("ih,nhw,jw->nij", tent, grey, tent) + 0.5)
  np.testing.assert_array_equal(images[..., 0], expected.astype(np.uint8))


def test_digits_stored_examples_match_source(digits_config):
  builder = tfds.builder("alphanet_digits", data_dir=digits_config.data_dir)
  source = builder.as_data_source(split="test")
  images, labels = digits_builder.digits_images_and_labels()
  for k in (0, 100, 358):
    example = source[k]
    np.testing.assert_array_equal(example["image"], images[example["index"]])
    assert example["label"] == labels[example["index"]]


def test_digits_cli_prints_location(digits_config):
  out = subprocess.run(
      [sys.executable, "-m", "alphanet_jax.data.digits", "--data_dir", digits_config.data_dir],
      capture_output=True, text=True, check=True, timeout=120)
  assert os.path.join(digits_config.data_dir, "alphanet_digits", "1.0.0") in out.stdout


def test_tiny_config_reads_digits(tiny_config, digits_dir):
  config = ml_collections.ConfigDict(tiny_config.to_dict())
  config.data_dir = str(digits_dir)
  config.input = INPUT
  batch = next(data.train_iterator(config, seed=0, start_step=0, local_batch_size=4,
                                   process_index=0, process_count=1))
  assert batch["image"].shape == (4, config.image_size, config.image_size, 3)
  opts = data.options_from_config(config)
  assert (opts.crop, opts.flip, opts.autoaugment) == ("pad", False, None)


# ---------------------------------------------------------------------------------------------
# Training stream: shapes, determinism, resume, hosts.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "imagenet"])
def test_train_batch_shapes_dtypes_ranges(name, digits_config, imagenet_config):
  config = {"digits": digits_config, "imagenet": _with(imagenet_config)}[name]
  if name == "imagenet":
    config.image_size = 224
  size = config.image_size
  it = data.train_iterator(config, seed=0, start_step=0, local_batch_size=4, process_index=0,
                           process_count=1)
  for batch in _take(it, 3):
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (4, size, size, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    # Normalised uint8 pixels: (0 - 0.485) / 0.229 = -2.118 .. (1 - 0.406) / 0.225 = 2.640.
    assert batch["image"].min() >= -2.1180 and batch["image"].max() <= 2.6401
    assert np.all((batch["label"] >= 0) & (batch["label"] < (10 if name == "digits" else 3)))


def test_bfloat16_output(digits_config):
  it = data.train_iterator(_with(digits_config, dtype="bfloat16"), seed=0, start_step=0,
                           local_batch_size=2, process_index=0, process_count=1)
  assert next(it)["image"].dtype.name == "bfloat16"


@pytest.mark.parametrize("name", ["digits", "digits_tfrecord", "imagenet"])
def test_train_stream_is_a_function_of_seed_and_step(name, digits_config,
                                                     digits_tfrecord_config, imagenet_config):
  config = {"digits": digits_config, "digits_tfrecord": digits_tfrecord_config,
            "imagenet": imagenet_config}[name]
  batch = 4 if name == "imagenet" else 64
  steps_per_epoch = data.dataset_info(config)["num_train"] // batch

  def run(seed, start, n):
    return _take(data.train_iterator(config, seed=seed, start_step=start,
                                     local_batch_size=batch, process_index=0,
                                     process_count=1), n)

  # Long enough to cross an epoch boundary: 3 steps per epoch (imagenet), 22 (digits).
  n = steps_per_epoch + 2
  full = run(7, 0, n)
  _assert_same_batches(full, run(7, 0, n))
  k = steps_per_epoch - 1
  _assert_same_batches(full[k:], run(7, k, n - k))
  _assert_same_batches(full[1:3], run(7, 1, 2))
  other = run(8, 0, 1)[0]
  assert not np.array_equal(other["image"], full[0]["image"])
  # A new epoch is a new order and new augmentations.
  assert not np.array_equal(full[0]["image"], full[steps_per_epoch]["image"])


def test_host_parts_disjoint_and_cover_an_epoch(digits_config):
  """Index reader: hosts' batches are disjoint and an epoch covers N - N mod G examples."""
  config = _with(digits_config, augment=NO_AUGMENT)
  hosts, batch = 3, 16
  per_epoch = 1438 // (hosts * batch)
  seen = []
  for p in range(hosts):
    it = data.train_iterator(config, seed=1, start_step=0, local_batch_size=batch,
                             process_index=p, process_count=hosts)
    seen.append([_digest(im) for b in _take(it, per_epoch) for im in b["image"]])
  all_train = collections.Counter(
      _digest(im) for b in data.eval_iterator(config, split="train", local_batch_size=100,
                                              process_index=0, process_count=1)
      for im, m in zip(b["image"], b["mask"]) if m)
  union = collections.Counter(d for part in seen for d in part)
  assert sum(union.values()) == per_epoch * hosts * batch
  for digest, count in union.items():  # every example at most once (duplicates in the source
    assert count <= all_train[digest]    # digits are allowed as often as they occur there)
  for p in range(hosts):
    for q in range(p + 1, hosts):
      overlap = collections.Counter(seen[p]) & collections.Counter(seen[q])
      assert all(all_train[d] > 1 for d in overlap)


def test_global_batch_does_not_depend_on_host_count(digits_config):
  """Index reader: 1 host x 6 images == 3 hosts x 2 images, bit for bit, augmentation included."""
  config = _with(digits_config, augment=dict(crop="random_resized", flip=True, autoaugment="v0"))

  def batches(p, hosts, batch):
    return _take(data.train_iterator(config, seed=3, start_step=2, local_batch_size=batch,
                                     process_index=p, process_count=hosts), 2)

  one = batches(0, 1, 6)
  three = [batches(p, 3, 2) for p in range(3)]
  for t in range(2):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          one[t][key], np.concatenate([three[p][t][key] for p in range(3)]))


def test_stream_reader_hosts_are_disjoint(digits_tfrecord_config):
  config = _with(digits_tfrecord_config, augment=NO_AUGMENT)
  parts = []
  for p in range(2):
    it = data.train_iterator(config, seed=0, start_step=0, local_batch_size=32,
                             process_index=p, process_count=2)
    parts.append({_digest(im) for b in _take(it, 719 // 32) for im in b["image"]})
  assert len(parts[0] & parts[1]) <= 3  # only the source's few duplicate images


def test_calibration_stream(digits_config):
  calib = data.calib_iterator(digits_config, seed=5, local_batch_size=8, num_batches=3,
                              process_index=0, process_count=1)
  batches = list(calib)
  assert len(batches) == 3 and len(calib) == 3
  again = list(data.calib_iterator(digits_config, seed=5, local_batch_size=8, num_batches=3,
                                   process_index=0, process_count=1))
  _assert_same_batches(batches, again)
  train = next(data.train_iterator(digits_config, seed=5, start_step=0, local_batch_size=8,
                                   process_index=0, process_count=1))
  assert not np.array_equal(train["image"], batches[0]["image"])


def test_default_augmentation_is_the_spec_recipe(imagenet_config):
  opts = data.options_from_config(imagenet_config)
  assert opts.crop == "random_resized" and opts.crop_scale == (0.08, 1.0)
  assert opts.crop_ratio == pytest.approx((3 / 4, 4 / 3))
  assert opts.flip and opts.autoaugment == "v0" and opts.eval_resize == 73  # 64 * 256 / 224
  config = _with(imagenet_config)
  config.image_size = 224
  assert data.options_from_config(config).eval_resize == 256


# ---------------------------------------------------------------------------------------------
# Evaluation: exact counts on any number of hosts.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hosts", [1, 3])
@pytest.mark.parametrize("reader", ["index", "stream"])
def test_eval_counts_every_image_once(hosts, reader, digits_config, digits_tfrecord_config):
  config = digits_config if reader == "index" else digits_tfrecord_config
  batch = 16
  counts, labels, lengths = 0, collections.Counter(), set()
  for p in range(hosts):
    it = data.eval_iterator(config, local_batch_size=batch, process_index=p,
                            process_count=hosts)
    batches = list(it)
    lengths.add(len(batches))
    assert len(batches) == len(it) == data.eval_num_batches(359, batch, hosts)
    for b in batches:
      assert b["image"].shape == (batch, 32, 32, 3) and b["mask"].dtype == np.float32
      counts += int(b["mask"].sum())
      labels.update(b["label"][b["mask"] > 0].tolist())
  assert counts == 359 and len(lengths) == 1
  _, all_labels = digits_builder.digits_images_and_labels()
  _, test_rows = digits_builder.stratified_split(all_labels)
  assert labels == collections.Counter(all_labels[test_rows].tolist())


@pytest.mark.parametrize("hosts", [1, 3])
def test_eval_counts_fake_imagenet(hosts, imagenet_config):
  total = 0
  for p in range(hosts):
    it = data.eval_iterator(imagenet_config, local_batch_size=2, process_index=p,
                            process_count=hosts)
    for b in it:
      assert b["image"].shape == (2, 64, 64, 3)
      total += b["mask"].sum()
  assert total == data.num_examples(imagenet_config, "validation") == 5


# ---------------------------------------------------------------------------------------------
# Bad data.
# ---------------------------------------------------------------------------------------------


def test_corrupt_train_image_is_skipped_and_counted(imagenet_config):
  it = data.train_iterator(imagenet_config, seed=0, start_step=0, local_batch_size=4,
                           process_index=0, process_count=1)
  batches = _take(it, 3)  # one epoch: all 12 images, one of them corrupt
  assert it.num_corrupt == 1
  for b in batches:
    assert b["image"].shape == (4, 64, 64, 3)
    # The corrupt slot holds another image of the batch, never a black placeholder.
    assert np.all(np.abs(b["image"]).reshape(4, -1).max(axis=1) > 0.1)
  ev = data.eval_iterator(imagenet_config, split="train", local_batch_size=5,
                          process_index=0, process_count=1)
  assert sum(b["mask"].sum() for b in ev) == 11 and ev.num_corrupt == 1


def test_missing_imagenet_explains_how_to_prepare(tmp_path):
  config = _config("imagenet2012", tmp_path, 224)
  with pytest.raises(data.DatasetNotFoundError) as err:
    data.dataset_info(config)
  message = str(err.value)
  assert "imagenet2012" in message and str(tmp_path) in message
  assert os.path.join(str(tmp_path), "downloads", "manual", "ILSVRC2012_img_train.tar") in message
  assert "ILSVRC2012_img_val.tar" in message and "tfds build imagenet2012" in message


def test_unknown_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match="no_such_dataset"):
    data.dataset_info(_config("no_such_dataset", tmp_path, 32))


# ---------------------------------------------------------------------------------------------
# tfds.testing.mock_data: the ImageNet code path without ImageNet.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["index", "stream"])
def test_imagenet_path_on_mock_data(reader, imagenet_config, monkeypatch):
  """Random examples from TFDS's mock in place of the records; metadata (split sizes) from the
  fake build, as TFDS's USE_FILES policy expects."""
  config = _with(imagenet_config, reader=reader)
  # TFDS 4.9.10's mock installs its batch getter as a plain attribute, so it is called without
  # `self` and fails; the single-item getter is fine. Give the batch getter the same shape.
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(mocking, "_getitems",
                      lambda keys, generator, serialized=False: [generator[k] for k in keys])
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=imagenet_config.data_dir):
    info = data.dataset_info(config)
    assert info["num_classes"] == 1000
    it = data.train_iterator(config, seed=0, start_step=0, local_batch_size=4,
                             process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and np.all(batch["label"] < 1000)
    again = next(data.train_iterator(config, seed=0, start_step=0, local_batch_size=4,
                                     process_index=0, process_count=1))
    np.testing.assert_array_equal(batch["image"], again["image"])
    total = sum(b["mask"].sum() for b in data.eval_iterator(
        config, local_batch_size=2, process_index=1, process_count=2))
    assert total == 2  # host 1 of 2 holds validation[3:5]


# ---------------------------------------------------------------------------------------------
# Crops and resizes.
# ---------------------------------------------------------------------------------------------


def test_random_resized_crop_window_properties():
  for s in range(40):
    top, left, h, w = np.asarray(transforms.random_resized_crop_window(
        300, 400, tf.constant([s, 9], tf.int64)))
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
    assert 0.08 * 120000 * 0.9 <= h * w <= 120000
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_fallback_is_the_clamped_centre():
  # An impossible scale range forces the fallback: a centre crop clamped to ratio 4/3.
  window = transforms.random_resized_crop_window(100, 400, tf.constant([0, 0], tf.int64),
                                                 scale=(2.0, 3.0))
  np.testing.assert_array_equal(window, [0, (400 - 133) // 2, 100, 133])
  window = transforms.random_resized_crop_window(90, 60, tf.constant([0, 0], tf.int64),
                                                 scale=(2.0, 3.0))
  np.testing.assert_array_equal(window, [(90 - 80) // 2, 0, 80, 60])
  window = transforms.random_resized_crop_window(50, 60, tf.constant([0, 0], tf.int64),
                                                 scale=(2.0, 3.0))
  np.testing.assert_array_equal(window, [0, 0, 50, 60])


def test_eval_resize_and_centre_crop_match_pil():
  rng = np.random.RandomState(0)
  encoded = fakes.jpeg_bytes(rng, 300, 451)
  decoded = np.asarray(transforms.decode_rgb(tf.constant(encoded)))
  out = np.asarray(transforms.resize_shorter_and_center_crop(tf.constant(decoded), 256, 224))
  # torchvision Resize(256): the long side is int(256 * 451 / 300) = 384; then CenterCrop(224).
  pil = Image.fromarray(decoded).resize((384, 256), Image.BICUBIC)
  left, top = int(round((384 - 224) / 2.0)), int(round((256 - 224) / 2.0))
  expected = np.asarray(pil)[top:top + 224, left:left + 224]
  diff = np.abs(out.astype(int) - expected.astype(int))
  assert out.shape == (224, 224, 3) and diff.mean() < 1.0 and np.percentile(diff, 99) <= 3


def test_train_decode_crop_matches_full_decode():
  """Decoding only the crop window of a JPEG gives (nearly) the crop of the full decode."""
  encoded = tf.constant(fakes.jpeg_bytes(np.random.RandomState(1), 200, 260))
  seed = tf.constant([4, 2], tf.int64)
  crop = np.asarray(transforms.decode_and_random_crop(encoded, seed, (0.08, 1.0), (0.75, 4 / 3)))
  top, left, h, w = np.asarray(transforms.random_resized_crop_window(200, 260, seed))
  full = np.asarray(transforms.decode_rgb(encoded))[top:top + h, left:left + w]
  assert crop.shape == full.shape
  assert np.abs(crop.astype(int) - full.astype(int)).mean() < 1.0


def test_normalize_is_totensor_then_normalize():
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  out = np.asarray(transforms.normalize(tf.constant(pixels)))
  mean = np.array([123.675, 116.28, 103.53], np.float32) / np.float32(255)
  std = np.array([58.395, 57.12, 57.375], np.float32) / np.float32(255)
  expected = (pixels.astype(np.float32) / np.float32(255) - mean) / std
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_safe_decode_reports_garbage():
  encoded = fakes.jpeg_bytes(np.random.RandomState(0), 40, 50)
  for payload, good in [(encoded, True), (encoded[:100], False), (b"not an image", False)]:
    image, ok = transforms.safe_decode(
        tf.constant(payload), lambda b: transforms.resize_uint8(transforms.decode_rgb(b), [8, 8]),
        8)
    assert bool(ok) == good and image.shape == (8, 8, 3)

