"""Tests for data_util: ranges, crop geometry, colour ops, blur, eval crop,
probabilities, stateless keys."""
import numpy as np
import pytest
import scipy.signal
import tensorflow as tf

import data_util


def _rand_image(h, w, seed=0, lo=0.0, hi=1.0):
  rng = np.random.RandomState(seed)
  return rng.uniform(lo, hi, size=(h, w, 3)).astype(np.float32)


def _key(i, j=0):
  return tf.constant([i, j], tf.int64)


def _draws(fn, image, n):
  """fn(image, seed=k) for the n keys [k, 0], k < n, inside a tf.data map."""
  image = tf.constant(image)
  ds = tf.data.Dataset.range(n).map(
      lambda k: fn(image, seed=tf.stack([k, tf.constant(0, tf.int64)])))
  return np.stack([x.numpy() for x in ds])


def _binomial_band(n, p, k=5.0):
  mean, sd = n * p, np.sqrt(n * p * (1 - p))
  return mean - k * sd, mean + k * sd


# ---------------------------------------------------------------- shapes/range

@pytest.mark.parametrize('size', [32, 64])
def test_preprocess_image_shapes_dtype_and_range(size):
  rng = np.random.RandomState(1)
  raw = rng.randint(0, 256, size=(size + 8, size + 4, 3)).astype(np.uint8)
  for is_training in (True, False):
    out = data_util.preprocess_image(tf.constant(raw), size, size,
                                     is_training=is_training, seed=_key(1))
    assert out.dtype == tf.float32
    assert out.shape == (size, size, 3)
  # test_crop=False on a same-size image: only the dtype conversion.
  same = raw[:size, :size]
  out = data_util.preprocess_image(tf.constant(same), size, size,
                                   is_training=False, test_crop=False)
  np.testing.assert_allclose(out.numpy(), same.astype(np.float32) / 255.,
                             atol=1e-7)


@pytest.mark.parametrize('size,randaugment', [(32, False), (64, True)])
def test_train_views_always_in_unit_range(size, randaugment):
  # Saturated input so that bicubic overshoot and jitter would leave [0, 1]
  # without the clipping.
  rng = np.random.RandomState(2)
  img = (rng.uniform(size=(size, size, 3)) > 0.5).astype(np.float32)
  ra = data_util.make_randaugment(2, 7) if randaugment else None
  fn = lambda x, seed: data_util.preprocess_for_train(
      x, size, size, blur=True, color_jitter_strength=1.0, randaugment=ra,
      seed=seed)
  out = _draws(fn, img, 150)
  assert out.shape == (150, size, size, 3)
  assert out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  # The views are not all identical (augmentation really happened).
  assert np.std(out, axis=0).mean() > 0.05


def test_eval_range_and_shape_with_non_square_input():
  img = (np.random.RandomState(3).uniform(size=(48, 64, 3)) > 0.5)
  out = data_util.preprocess_for_eval(tf.constant(img, tf.float32), 32, 32)
  assert out.shape == (32, 32, 3)
  assert out.numpy().min() >= 0.0 and out.numpy().max() <= 1.0


# ---------------------------------------------------------------- inception crop

@pytest.mark.parametrize('size,area_min', [(32, 0.08), (64, 0.08), (64, 0.5)])
def test_inception_crop_area_and_aspect(size, area_min):
  img = _rand_image(size, size, seed=4)

  def fn(k):
    out, box = data_util.crop_and_resize(
        tf.constant(img), size, size, area_range=(area_min, 1.0),
        return_box=True, seed=tf.stack([k, tf.constant(0, tf.int64)]))
    return out, tf.stack(box)

  ds = tf.data.Dataset.range(1000).map(fn)
  outs, boxes = zip(*[(o.numpy(), b.numpy()) for o, b in ds])
  boxes = np.stack(boxes).astype(np.float64)
  oy, ox, h, w = boxes.T
  area = h * w / (size * size)
  assert area.min() >= area_min - 1e-9
  assert area.max() <= 1.0
  # Boxes lie inside the image.
  assert (oy >= 0).all() and (ox >= 0).all()
  assert (oy + h <= size).all() and (ox + w <= size).all()
  # Aspect w/h in [3/4, 4/3] up to rounding the width to whole pixels.
  assert ((w - 0.5) / h <= 4. / 3. + 1e-6).all()
  assert ((w + 0.5) / h >= 3. / 4. - 1e-6).all()
  # The range is really explored down to area_min (SimCLR's
  # min_object_covered=0.1 would clamp it at 0.1).
  assert area.min() < area_min + 0.02
  assert area.max() > 0.9
  # The output is the bicubic resize of exactly that box.
  for k in range(5):
    y0, x0, hh, ww = boxes[k].astype(int)
    ref = tf.image.resize([img[y0:y0 + hh, x0:x0 + ww]], [size, size],
                          method='bicubic')[0].numpy()
    np.testing.assert_allclose(outs[k], ref, atol=1e-5)


def test_distorted_bounding_box_crop_returns_that_box():
  img = _rand_image(40, 30, seed=5)
  crop, (oy, ox, h, w) = data_util.distorted_bounding_box_crop(
      tf.constant(img), area_range=(0.2, 0.6), aspect_ratio_range=(0.5, 2.0),
      return_box=True, seed=_key(5))
  oy, ox, h, w = int(oy), int(ox), int(h), int(w)
  np.testing.assert_array_equal(crop.numpy(), img[oy:oy + h, ox:ox + w])
  assert 0.2 <= h * w / (40 * 30) <= 0.6


# ---------------------------------------------------------------- colour

@pytest.mark.parametrize('strength', [0.5, 1.0])
def test_brightness_is_multiplicative_within_range(strength):
  img = np.full((8, 8, 3), 0.5, np.float32)
  delta = 0.8 * strength
  out = _draws(lambda x, seed: data_util.random_brightness(x, delta,
                                                           seed=seed),
               img, 400)
  ratio = out[:, 0, 0, 0] / 0.5
  # Constant factor over the whole image.
  np.testing.assert_allclose(out / out[:, :1, :1, :1], 1.0, atol=1e-6)
  assert ratio.min() >= 1 - delta - 1e-6
  assert ratio.max() <= 1 + delta + 1e-6
  assert ratio.min() < 1 - delta + 0.1 * delta
  assert ratio.max() > 1 + delta - 0.1 * delta


def test_grayscale_luma_weights_and_equal_channels():
  img = _rand_image(16, 16, seed=6)
  out = data_util.to_grayscale(tf.constant(img)).numpy()
  ref = img @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  assert out.shape == (16, 16, 3)
  for c in range(3):
    np.testing.assert_allclose(out[..., c], ref, atol=1e-4)
  one = data_util.to_grayscale(tf.constant(img), keep_channels=False)
  assert one.shape == (16, 16, 1)


def test_color_jitter_clips_and_changes_image():
  img = _rand_image(16, 16, seed=7)
  out = _draws(lambda x, seed: data_util.color_jitter(x, 1.0, seed=seed),
               img, 50)
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert (np.abs(out - img).reshape(50, -1).max(axis=1) > 1e-3).all()


def test_color_jitter_zero_strength_is_identity():
  img = _rand_image(8, 8, seed=8)
  out = data_util.color_jitter(tf.constant(img), 0.0, seed=_key(8)).numpy()
  np.testing.assert_allclose(out, img, atol=1e-6)


# ---------------------------------------------------------------- blur

@pytest.mark.parametrize('kernel_size,sigma', [(7, 1.3), (6, 0.8), (3, 2.0)])
def test_gaussian_blur_matches_scipy(kernel_size, sigma):
  img = _rand_image(32, 32, seed=9)
  r = kernel_size // 2
  x = np.arange(-r, r + 1, dtype=np.float64)
  k1 = np.exp(-x ** 2 / (2 * sigma ** 2))
  k1 /= k1.sum()
  k2 = np.outer(k1, k1)
  for padding, mode in (('SAME', 'same'), ('VALID', 'valid')):
    out = data_util.gaussian_blur(tf.constant(img), kernel_size, sigma,
                                  padding=padding).numpy()
    ref = np.stack([scipy.signal.convolve2d(img[..., c], k2, mode=mode,
                                            boundary='fill', fillvalue=0)
                    for c in range(3)], axis=-1)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_blur_of_constant_image_is_constant_inside():
  img = np.full((32, 32, 3), 0.37, np.float32)
  out = data_util.gaussian_blur(tf.constant(img), 7, 1.5).numpy()
  np.testing.assert_allclose(out[3:-3, 3:-3], 0.37, atol=1e-6)


def test_random_blur_probability_endpoints():
  img = _rand_image(64, 64, seed=10)
  same = data_util.random_blur(tf.constant(img), 64, 64, p=0.0,
                               seed=_key(10)).numpy()
  np.testing.assert_array_equal(same, img)
  out = _draws(lambda x, seed: data_util.random_blur(x, 64, 64, p=1.0,
                                                     seed=seed), img, 20)
  # Kernel 64 // 10 = 6 -> 7 taps, non-negative and summing to 1, so the
  # energy ||blur(x)||² <= ||x||² (Young), strictly for all but tiny σ.
  energy = (out.astype(np.float64) ** 2).reshape(20, -1).sum(axis=1)
  ref = (img.astype(np.float64) ** 2).sum()
  assert (energy <= ref * (1 + 1e-6)).all()
  assert (energy < ref * 0.99).mean() > 0.5


# ---------------------------------------------------------------- eval crop

@pytest.mark.parametrize('shape', [(64, 64), (48, 64), (64, 40)])
def test_eval_center_crop_matches_numpy(shape):
  H, W = shape
  img = _rand_image(H, W, seed=11)
  out = data_util.preprocess_for_eval(tf.constant(img), 32, 32).numpy()
  side = int(np.rint(0.875 * min(H, W)))
  oy, ox = (H - side + 1) // 2, (W - side + 1) // 2
  ref = tf.image.resize([img[oy:oy + side, ox:ox + side]], [32, 32],
                        method='bicubic')[0].numpy()
  np.testing.assert_allclose(out, np.clip(ref, 0, 1), atol=1e-5)


def test_eval_center_crop_keeps_the_centre():
  # Centre 28x28 of a 32x32 image is white, the border black: the 0.875 crop
  # (28 px) is exactly the white region, so the output is all ones.
  img = np.zeros((32, 32, 3), np.float32)
  img[2:30, 2:30] = 1.0
  out = data_util.preprocess_for_eval(tf.constant(img), 32, 32).numpy()
  np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_eval_no_crop():
  img = _rand_image(32, 32, seed=12)
  out = data_util.preprocess_for_eval(tf.constant(img), 32, 32, crop=False)
  np.testing.assert_array_equal(out.numpy(), img)
  big = _rand_image(40, 40, seed=13)
  out = data_util.preprocess_for_eval(tf.constant(big), 32, 32, crop=False)
  ref = tf.image.resize([big], [32, 32], method='bicubic')[0].numpy()
  np.testing.assert_allclose(out.numpy(), np.clip(ref, 0, 1), atol=1e-6)


# ---------------------------------------------------------------- views

def test_two_views_in_one_function_differ_by_key_only():
  img = _rand_image(32, 32, seed=14)

  @tf.function
  def two_views(x, k):
    return (data_util.preprocess_for_train(x, 32, 32, blur=True,
                                           seed=_key(k, 0)),
            data_util.preprocess_for_train(x, 32, 32, blur=True,
                                           seed=_key(k, 1)))

  first = [tuple(v.numpy() for v in two_views(tf.constant(img), k))
           for k in range(5)]
  for k, (a, b) in enumerate(first):
    assert np.abs(a - b).max() > 1e-3
    # Same keys again (traced, and eagerly): bitwise the same views.
    again = two_views(tf.constant(img), k)
    np.testing.assert_array_equal(again[0].numpy(), a)
    eager = data_util.preprocess_for_train(tf.constant(img), 32, 32,
                                           blur=True, seed=_key(k, 1))
    np.testing.assert_array_equal(eager.numpy(), b)


def test_all_augmentations_off_is_identity():
  img = _rand_image(32, 32, seed=15)

  @tf.function
  def f(x):
    return data_util.preprocess_for_train(x, 32, 32, color_distort=False,
                                          crop=False, flip=False, blur=False,
                                          seed=_key(15))

  np.testing.assert_array_equal(f(tf.constant(img)).numpy(), img)


# ---------------------------------------------------------------- probabilities

def test_flip_probability():
  img = _rand_image(32, 32, seed=16)
  out = _draws(lambda x, seed: data_util.preprocess_for_train(
      x, 32, 32, color_distort=False, crop=False, flip=True, seed=seed),
               img, 400)
  flipped = np.array([np.array_equal(o, img[:, ::-1]) for o in out])
  kept = np.array([np.array_equal(o, img) for o in out])
  assert (flipped ^ kept).all()
  lo, hi = _binomial_band(400, 0.5)
  assert lo <= flipped.sum() <= hi


def test_jitter_and_grayscale_probabilities():
  img = _rand_image(16, 16, seed=17, lo=0.1, hi=0.9)
  gray_img = data_util.to_grayscale(tf.constant(img)).numpy()
  n = 1000
  out = _draws(lambda x, seed: data_util.preprocess_for_train(
      x, 16, 16, crop=False, flip=False, seed=seed), img, n)
  gray = np.array([np.allclose(o[..., 0], o[..., 1], atol=1e-6) and
                   np.allclose(o[..., 0], o[..., 2], atol=1e-6) for o in out])
  jittered = np.array([
      np.abs(o - (gray_img if g else img)).max() > 1e-4
      for o, g in zip(out, gray)])
  lo, hi = _binomial_band(n, 0.8)
  assert lo <= jittered.sum() <= hi
  lo, hi = _binomial_band(n, 0.2)
  assert lo <= gray.sum() <= hi


def test_random_apply_probability():
  hits = _draws(lambda v, seed: data_util.random_apply(
      lambda t: t + 1.0, 0.3, v, seed=seed), np.float32(0.0), 1000).sum()
  lo, hi = _binomial_band(1000, 0.3)
  assert lo <= hits <= hi


# ---------------------------------------------------------------- RandAugment

def test_make_randaugment_is_model_garden():
  from official.vision.ops import augment
  ra = data_util.make_randaugment(num_layers=2, magnitude=7)
  assert isinstance(ra, augment.RandAugment)
  assert ra.num_layers == 2 and ra.magnitude == 7.0
  img = tf.constant(np.random.RandomState(18).randint(
      0, 256, (32, 32, 3)).astype(np.uint8))
  out = ra.distort(img)
  assert out.dtype == tf.uint8 and out.shape == (32, 32, 3)


def test_randaugment_gets_uint8_and_is_converted_back():
  img = _rand_image(16, 16, seed=19)
  seen = []

  def invert(x):
    seen.append(x.dtype)
    return 255 - x

  out = data_util.preprocess_for_train(
      tf.constant(img), 16, 16, color_distort=False, crop=False, flip=False,
      randaugment=invert, seed=_key(19)).numpy()
  assert seen == [tf.uint8]
  u8 = tf.image.convert_image_dtype(img, tf.uint8, saturate=True).numpy()
  np.testing.assert_allclose(out, (255 - u8.astype(np.float32)) / 255.,
                             atol=1e-6)


def test_randaugment_placed_after_jitter_before_grayscale():
  # A "RandAugment" that paints the image pure red. After jitter: jitter
  # cannot show. Before grayscale: the result is red or gray(red), both seen.
  img = _rand_image(8, 8, seed=20)
  red = np.zeros((8, 8, 3), np.float32)
  red[..., 0] = 1.0
  paint = lambda x: tf.ones_like(x) * tf.constant([255, 0, 0], tf.uint8)
  out = _draws(lambda x, seed: data_util.preprocess_for_train(
      x, 8, 8, crop=False, flip=False, randaugment=paint, seed=seed), img, 200)
  gray_red = np.full((8, 8, 3), 0.2989, np.float32)
  is_red = np.array([np.allclose(o, red, atol=1e-6) for o in out])
  is_gray = np.array([np.allclose(o, gray_red, atol=1e-3) for o in out])
  assert (is_red | is_gray).all()
  assert is_red.sum() > 100 and is_gray.sum() > 10


# ------------------------------------------------------------ stateless keys

_KEYED = {
    'brightness': lambda x, seed: data_util.random_brightness(x, 0.8,
                                                              seed=seed),
    'brightness_v1': lambda x, seed: data_util.random_brightness(
        x, 0.8, impl='simclrv1', seed=seed),
    'jitter': lambda x, seed: data_util.color_jitter(x, 1.0, seed=seed),
    'color': lambda x, seed: data_util.random_color_jitter(x, seed=seed),
    'crop': lambda x, seed: data_util.crop_and_resize(x, 32, 32, seed=seed),
    'blur': lambda x, seed: data_util.random_blur(x, 32, 32, p=1.0,
                                                  seed=seed),
    'train': lambda x, seed: data_util.preprocess_for_train(
        x, 32, 32, blur=True, seed=seed),
    'image': lambda x, seed: data_util.preprocess_image(
        x, 32, 32, is_training=True, use_blur=True, seed=seed),
}


@pytest.mark.parametrize('name', sorted(_KEYED))
def test_random_ops_are_functions_of_their_key(name):
  """Same key -> bitwise the same output, whatever was drawn before (keys in
  reverse order, eager vs tf.data); different keys -> different outputs."""
  fn = _KEYED[name]
  img = _rand_image(32, 32, seed=21, lo=0.1, hi=0.9)
  out = _draws(fn, img, 20)
  again = _draws(lambda x, seed: fn(x, seed=tf.stack([19 - seed[0], seed[1]])),
                 img, 20)[::-1]
  np.testing.assert_array_equal(out, again)
  np.testing.assert_array_equal(fn(tf.constant(img), seed=_key(3)).numpy(),
                                out[3])
  distinct = len({o.tobytes() for o in out})
  assert distinct >= 15  # 'color' keeps the image with probability 0.04.


def test_training_preprocessing_requires_a_seed():
  raw = tf.constant(np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match='seed'):
    data_util.preprocess_image(raw, 32, 32, is_training=True)
  out = data_util.preprocess_image(raw, 32, 32, is_training=False)
  assert out.shape == (32, 32, 3)


def test_blur_option_leaves_the_other_draws_unchanged():
  """Each draw has its own sub-key: with blur on, a view is the blur-off
  view (when the blur coin says no) or differs only by the blur."""
  img = _rand_image(32, 32, seed=22, lo=0.1, hi=0.9)
  plain = _draws(lambda x, seed: data_util.preprocess_for_train(
      x, 32, 32, blur=False, seed=seed), img, 60)
  blurred = _draws(lambda x, seed: data_util.preprocess_for_train(
      x, 32, 32, blur=True, seed=seed), img, 60)
  same = np.array([np.array_equal(a, b) for a, b in zip(plain, blurred)])
  lo, hi = _binomial_band(60, 0.5)
  assert lo <= same.sum() <= hi
  # Elsewhere the blur-off view low-passed: smoother away from the
  # zero-padded border.
  def roughness(v):
    return np.abs(np.diff(v[2:-2, 2:-2], axis=1)).mean()
  for a, b in zip(plain[~same], blurred[~same]):
    assert roughness(b) <= roughness(a) + 1e-6  # σ near 0.1: ~identity


def test_blur_coin_and_sigma_distribution(monkeypatch):
  """random_blur applies with p = 0.5 and draws σ ~ U(0.1, 2): a stand-in
  blur writes its σ into the image."""
  monkeypatch.setattr(data_util, 'gaussian_blur',
                      lambda image, kernel_size, sigma, padding: tf.fill(
                          tf.shape(image), sigma))
  out = _draws(lambda x, seed: data_util.random_blur(x, 32, 32, p=0.5,
                                                     seed=seed),
               np.zeros((2, 2, 3), np.float32), 2000)[:, 0, 0, 0]
  sigma = out[out > 0]
  lo, hi = _binomial_band(2000, 0.5)
  assert lo <= len(sigma) <= hi
  assert sigma.min() >= 0.1 and sigma.max() <= 2.0
  # Uniform: the empirical CDF is within 5 standard deviations (KS-like).
  grid = np.linspace(0.1, 2.0, 20)
  ecdf = np.searchsorted(np.sort(sigma), grid) / len(sigma)
  np.testing.assert_allclose(ecdf, (grid - 0.1) / 1.9,
                             atol=5 * 0.5 / np.sqrt(len(sigma)))


def test_jitter_order_is_a_uniform_permutation(monkeypatch):
  """Stand-in ops x -> x / 5 + k / 25 (k = 1..4, never clipped) write the
  order they ran in as base-5 digits; all 24 orders are equally likely."""
  def fake_ops(brightness, contrast, saturation, hue, impl, keys):
    del brightness, contrast, saturation, hue, impl, keys
    return [lambda x, k=k: x / 5 + k / 25 for k in range(1, 5)]
  monkeypatch.setattr(data_util, '_jitter_ops', fake_ops)
  n = 2400
  out = _draws(lambda x, seed: data_util.color_jitter(x, 1.0, seed=seed),
               np.zeros((1, 1, 3), np.float32), n)[:, 0, 0, 0].astype(
                   np.float64)
  # Ops k1, k2, k3, k4 in turn from 0 give k1/3125 + k2/625 + k3/125 + k4/25.
  codes = np.rint(out * 3125).astype(int)
  seqs = [(c % 5, c // 5 % 5, c // 25 % 5, c // 125 % 5) for c in codes]
  assert all(sorted(s) == [1, 2, 3, 4] for s in seqs)
  _, counts = np.unique(np.array(seqs), axis=0, return_counts=True)
  assert len(counts) == 24
  lo, hi = _binomial_band(n, 1 / 24)
  assert lo <= counts.min() and counts.max() <= hi


# ------------------------------------------------------- blur on the device


def test_gaussian_taps_per_sigma_and_identity_at_zero():
  taps = data_util.gaussian_taps(7, tf.constant([[0.0, 1.3], [2.0, 0.0]]))
  assert taps.shape == (2, 2, 7)
  np.testing.assert_allclose(tf.reduce_sum(taps, -1).numpy(), 1.0, atol=1e-6)
  identity = np.eye(7)[3]
  np.testing.assert_array_equal(taps[0, 0].numpy(), identity)
  np.testing.assert_array_equal(taps[1, 1].numpy(), identity)
  x = np.arange(-3, 4)
  k = np.exp(-x ** 2 / (2 * 1.3 ** 2))
  np.testing.assert_allclose(taps[0, 1].numpy(), k / k.sum(), rtol=1e-6)


@pytest.mark.parametrize('size', [32, 64])
def test_device_blur_of_a_batch_equals_the_host_views(size):
  """blur_views of the deferred views (blur_sigma drawn, view left before
  its blur and final clip) equals the host-blurred views of the same keys:
  6 images x 2 views, some blurred and some not (kernel size // 10 = 3
  or 6 taps -> 3 or 7), to float rounding; unblurred views exactly."""
  rng = np.random.RandomState(size)
  images = rng.uniform(size=(6, size + 8, size + 8, 3)).astype(np.float32)
  host, deferred, sigmas = [], [], []
  for i, image in enumerate(images):
    views, pre, sig = [], [], []
    for v in range(2):
      key = _key(i, v)
      views.append(data_util.preprocess_for_train(
          tf.constant(image), size, size, blur=True, seed=key))
      view, sigma = data_util.preprocess_for_train(
          tf.constant(image), size, size, blur=True, defer_blur=True,
          seed=key)
      pre.append(view)
      sig.append(sigma)
    host.append(tf.concat(views, -1))
    deferred.append(tf.concat(pre, -1))
    sigmas.append(tf.stack(sig))
  host, sigmas = np.stack(host), np.stack(sigmas)
  assert 0 < (sigmas > 0).sum() < sigmas.size  # some of each
  assert ((sigmas == 0) | ((sigmas >= 0.1) & (sigmas <= 2.0))).all()
  device = data_util.blur_views(tf.stack(deferred), sigmas).numpy()
  assert device.shape == (6, size, size, 6)
  np.testing.assert_allclose(device, host, atol=1e-6, rtol=0)
  for i, v in zip(*np.nonzero(sigmas == 0)):
    np.testing.assert_array_equal(device[i, ..., 3 * v:3 * v + 3],
                                  host[i, ..., 3 * v:3 * v + 3])
  # The deferred view is unclipped: its clip must follow the blur.
  finished = data_util.finish_views({'image': tf.stack(deferred),
                                     'blur_sigma': sigmas, 'id': np.arange(6)})
  assert set(finished) == {'image', 'id'}
  np.testing.assert_array_equal(finished['image'].numpy(), device)


def test_blur_sigma_is_the_host_blurs_draw():
  """random_blur blurs with exactly the σ of blur_sigma (0: untouched)."""
  img = _rand_image(40, 40, seed=30)
  for k in range(12):
    sigma = float(data_util.blur_sigma(0.5, seed=_key(k)))
    out = data_util.random_blur(tf.constant(img), 40, 40, p=0.5,
                                seed=_key(k)).numpy()
    expected = (data_util.gaussian_blur(tf.constant(img), 4, sigma).numpy()
                if sigma > 0 else img)
    np.testing.assert_array_equal(out, expected)


def test_finish_views_leaves_a_batch_without_sigma_alone():
  batch = {'image': tf.constant(_rand_image(4, 4)[None] * 3 - 1)}
  assert data_util.finish_views(batch) is batch
