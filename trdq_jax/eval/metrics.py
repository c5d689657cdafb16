"""Sample-quality metrics: Frechet distance, class match, PSNR, SSIM, noise-prediction error.

All statistics are computed on the host in numpy float64. Images are ``[N, H, W, C]``; videos
``[N, F, H, W, C]`` are treated frame by frame where a metric is defined on images.

Naming: ``digits_fid`` is the Frechet distance in the feature space of whatever ``feature_fn``
you pass. With ``DigitsClassifier.features`` report it as "digits-FID"; only with Inception-v3
pool3 features on natural images is it the FID of Heusel et al. (2017).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

# ----------------------------------------------------------------------------- validation


def _as_float64(x, name: str, min_ndim: int = 1) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return array


def _as_images(x, name: str) -> np.ndarray:
    """``[N, H, W, C]`` or ``[N, F, H, W, C]`` float64 (finite, non-empty)."""
    array = _as_float64(x, name)
    if array.ndim not in (4, 5) or array.shape[0] == 0:
        raise ValueError(f"{name}: expected non-empty [N, H, W, C] images or [N, F, H, W, C] videos, "
                         f"got shape {array.shape}")
    return array


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected the shape of {name_a} {a.shape}, got {b.shape}")


def _check_data_range(data_range: float, **arrays: np.ndarray) -> None:
    if not isinstance(data_range, (int, float)) or isinstance(data_range, bool) or data_range <= 0:
        raise ValueError(f"data_range: expected a positive number, got {data_range!r}")
    for name, array in arrays.items():
        spread = float(array.max() - array.min())
        if spread > data_range * (1 + 1e-6):
            raise ValueError(f"{name}: values span {spread:.4g}, more than data_range={data_range}; "
                             "clip samples to the data range first")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")


def _frames(images: np.ndarray) -> np.ndarray:
    """Videos ``[N, F, H, W, C]`` -> frames ``[N*F, H, W, C]``; images pass through."""
    return images.reshape(-1, *images.shape[-3:])


# ----------------------------------------------------------------------------- Frechet distance


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """``[N, F]`` features (N >= 2) -> ``(mean [F], covariance [F, F])`` float64, unbiased (N-1)."""
    feats = _as_float64(features, "features", 2)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features: expected [N, F] with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via ``eigh`` (negative eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))`` in float64.

    ``tr((cov1 cov2)^(1/2))`` is evaluated as ``sum sqrt(eig(S cov2 S))`` with ``S = cov1^(1/2)``:
    ``S cov2 S`` is symmetric PSD and similar to ``cov1 cov2``, so ``eigh`` suffices and the
    result is real, without the complex round-off of a general ``sqrtm``.
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    cov1, cov2 = _as_float64(cov1, "cov1", 2), _as_float64(cov2, "cov2", 2)
    if mu1.ndim != 1:
        raise ValueError(f"mu1: expected a [F] vector, got shape {mu1.shape}")
    dim = mu1.shape[0]
    _check_same_shape(mu1, mu2, "mu1", "mu2")
    for name, cov in (("cov1", cov1), ("cov2", cov2)):
        if cov.shape != (dim, dim):
            raise ValueError(f"{name}: expected [{dim}, {dim}] to match mu1, got shape {cov.shape}")
    root1 = _sqrt_psd(cov1)
    inner = root1 @ cov2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def _batched(fn: Callable, frames: np.ndarray, batch_size: int) -> np.ndarray:
    outputs = [np.asarray(fn(frames[i:i + batch_size].astype(np.float32)))
               for i in range(0, len(frames), batch_size)]
    return np.concatenate(outputs, axis=0)


def digits_fid(images_a, images_b, feature_fn: Callable, batch_size: int = 256) -> float:
    """Frechet distance between the ``feature_fn`` features of two image (or video) sets.

    Args:
      images_a, images_b: ``[N, H, W, C]`` images or ``[N, F, H, W, C]`` videos (each frame is
        one sample: a per-frame FID, so videos may be compared with images); the frame shape
        ``[H, W, C]`` must agree, N may differ, each set needs >= 2 frames.
      feature_fn: ``float32 [B, H, W, C] -> [B, D]``, called on batches of at most ``batch_size``
        (e.g. ``eval.make_feature_fn(classifier, params)`` -> "digits-FID", or Inception pool3).
    Returns:
      the distance, a Python float (0 for identical feature distributions).
    """
    a, b = _as_images(images_a, "images_a"), _as_images(images_b, "images_b")
    if a.shape[-3:] != b.shape[-3:]:
        raise ValueError(f"images_b: expected frames of shape {a.shape[-3:]} like images_a, "
                         f"got {b.shape[-3:]}")
    return fid_from_features(frame_features(a, feature_fn, batch_size, "images_a"),
                             frame_features(b, feature_fn, batch_size, "images_b"))


def frame_features(images, feature_fn: Callable, batch_size: int = 256,
                   name: str = "images") -> np.ndarray:
    """``feature_fn`` of every frame: ``[N, D]`` for images, ``[N, F, D]`` for videos (the
    features ``digits_fid`` compares, per sample, so that samples can be resampled)."""
    x = _as_images(images, name)
    _check_batch_size(batch_size)
    features = _batched(feature_fn, _frames(x), batch_size)
    if features.ndim != 2 or features.shape[0] != len(_frames(x)):
        raise ValueError(f"feature_fn: expected [B, D] features per batch, got {features.shape} "
                         f"for {name}")
    return features.reshape(*x.shape[:-3], features.shape[-1])


def fid_from_features(features_a, features_b) -> float:
    """``digits_fid`` from ``frame_features`` of the two sets (``[N, D]`` or ``[N, F, D]``)."""
    a, b = (np.asarray(f) for f in (features_a, features_b))
    return frechet_distance(*feature_stats(a.reshape(-1, a.shape[-1])),
                            *feature_stats(b.reshape(-1, b.shape[-1])))


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` sample indices drawn with replacement by
    ``numpy.random.default_rng(seed)``: the same draws for every statistic of one sample set."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples: expected a positive int, got {resamples!r}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(values, level: float = 0.95) -> list[float]:
    """``[lo, hi]``: the central ``level`` of ``values`` (the percentile bootstrap interval)."""
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    lo, hi = np.percentile(np.asarray(values, np.float64), [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def bootstrap_class_match(hits, resamples: int = 1000, seed: int = 0,
                          level: float = 0.95) -> dict:
    """Percentile-bootstrap intervals of ``class_match_from_hits(hits)``, resampling samples
    (videos as a whole): ``{"accuracy": [lo, hi]}`` (+ ``frame_accuracy``, ``video_accuracy``
    for videos)."""
    hits = np.asarray(hits, bool)
    idx = bootstrap_indices(len(hits), resamples, seed)
    if hits.ndim == 1:
        return {"accuracy": percentile_interval(hits[idx].mean(axis=1), level)}
    per_video = hits.mean(axis=1)[idx].mean(axis=1)  # equal frame counts: mean of means
    all_right = percentile_interval(hits.all(axis=1)[idx].mean(axis=1), level)
    return {"frame_accuracy": percentile_interval(per_video, level), "video_accuracy": all_right,
            "accuracy": all_right}


def _one_blas_thread():
    """OpenBLAS limited to one thread: its threads and the XLA CPU client's spin against each
    other, which made the bootstrap's many small products and ``eigvalsh`` calls 10-40x slower
    once JAX had run (measured on 2 cores). ``threadpoolctl`` comes with scikit-learn."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


_OUTER_LIMIT = 2 ** 24  # elements (128 MiB) of per-sample outer products bootstrap_fid keeps


def bootstrap_fid(features, reference_features, resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> list[float]:
    """Bootstrap interval of ``fid_from_features(features, reference_features)``: the
    samples (``features`` ``[N, D]``, or ``[N, F, D]``: videos resampled whole) are drawn with
    replacement, the reference set stays fixed.

    A resample repeats some samples and drops others, which raises the distance by itself
    (about ``tr(cov) / N`` from the mean alone), so the resampled distances are shifted by
    their mean minus the estimate before the central ``level`` is taken: the interval is
    centred on the estimate and has the spread of the distance at this sample count (how far
    another draw of N samples may move it), not the resampling bias.

    Each resample is a weighting of the N samples (how often each was drawn): its mean and
    unbiased covariance follow from the weights (the same numbers as ``np.cov`` of the drawn
    rows; one matrix product over per-sample outer products when they fit in 128 MiB, else
    row by row), ``cov_ref^(1/2)`` is computed once, and resamples go through ``eigvalsh``
    in chunks of about 64 MB.
    """
    feats = _as_float64(features, "features", 2)
    n, dim = feats.shape[0], feats.shape[-1]
    frames = feats.reshape(n, -1, dim)                     # [N, F, D]
    per_sample = frames.shape[1]
    x = frames.reshape(-1, dim)                            # [N*F, D]
    shift = x.mean(axis=0)
    x = x - shift                                          # centred: no cancellation below
    m = x.shape[0]
    if m < 2:
        raise ValueError(f"features: digits-FID needs at least 2 frames, got {m}")
    ref_mu, ref_cov = feature_stats(_as_float64(reference_features, "reference_features", 2)
                                    .reshape(-1, dim))
    root = _sqrt_psd(ref_cov)
    sums = x.reshape(n, per_sample, dim).sum(axis=1)       # [N, D] per sample (video)
    # per-sample sums of x x^T [N, D*D]: every resample's second moment is then one GEMM
    outer = (np.einsum("nfd,nfe->nde", x.reshape(n, per_sample, dim),
                       x.reshape(n, per_sample, dim)).reshape(n, dim * dim)
             if n * dim * dim <= _OUTER_LIMIT else None)

    def distances(weights):                                # [B, N] draw counts -> [B]
        mu = weights @ sums / m                            # [B, D], of the centred rows
        if outer is not None:
            second = (weights @ outer).reshape(-1, dim, dim)
        else:                                              # many samples: row by row
            w = np.repeat(weights, per_sample, axis=1)     # [B, N*F]: frames follow their sample
            second = np.matmul(np.swapaxes(w[:, :, None] * x, 1, 2), x)
        cov = (second - m * mu[:, :, None] * mu[:, None, :]) / (m - 1)
        inner = root @ cov @ root
        eig = np.linalg.eigvalsh((inner + np.swapaxes(inner, 1, 2)) / 2.0)
        trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum(axis=1)
        diff = mu + shift - ref_mu
        return (np.einsum("bd,bd->b", diff, diff) + np.trace(cov, axis1=1, axis2=2)
                + np.trace(ref_cov) - 2.0 * trace_sqrt)

    idx = bootstrap_indices(n, resamples, seed)
    chunk = int(np.clip(8_000_000 // (m * dim), 1, 100))
    values = []
    with _one_blas_thread():
        estimate = distances(np.ones((1, n)))[0]
        for start in range(0, resamples, chunk):
            rows = idx[start:start + chunk]
            weights = np.zeros((len(rows), n))
            np.add.at(weights, (np.arange(len(rows))[:, None], rows), 1.0)
            values.append(distances(weights))
    values = np.concatenate(values)
    return percentile_interval(values - (values.mean() - estimate), level)


# ----------------------------------------------------------------------------- class match


def class_match_accuracy(images, labels, classify_fn: Callable, batch_size: int = 256) -> dict:
    """How often the classifier recognises the class a sample was generated for.

    Args:
      images: ``[N, H, W, C]`` images or ``[N, F, H, W, C]`` videos.
      labels: ``[N]`` int target classes.
      classify_fn: ``float32 [B, H, W, C] -> [B]`` int predictions or ``[B, K]`` logits.
    Returns:
      images: ``{"accuracy"}``; videos: ``{"frame_accuracy"`` (fraction of frames classified as
      their video's label), ``"video_accuracy"`` (fraction of videos whose every frame matches),
      ``"accuracy"`` (= video_accuracy)``}``. Python floats in [0, 1].
    """
    return class_match_from_hits(class_match_hits(images, labels, classify_fn, batch_size))


def class_match_hits(images, labels, classify_fn: Callable, batch_size: int = 256) -> np.ndarray:
    """Whether each sample (each frame of a video) was classified as its label: bool ``[N]``
    for images, ``[N, F]`` for videos (arguments as ``class_match_accuracy``)."""
    x = _as_images(images, "images")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels: expected [{x.shape[0]}] ints matching images, got {y.dtype} {y.shape}")
    _check_batch_size(batch_size)
    predictions = _batched(classify_fn, _frames(x), batch_size)
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    if predictions.shape != (len(_frames(x)),):
        raise ValueError(f"classify_fn: expected [B] labels or [B, K] logits, got {predictions.shape}")
    return predictions.reshape(x.shape[:-3]) == (y if x.ndim == 4 else y[:, None])


def class_match_from_hits(hits: np.ndarray) -> dict:
    """``class_match_accuracy``'s dict from ``class_match_hits`` (``[N]`` or ``[N, F]``)."""
    hits = np.asarray(hits, bool)
    if hits.ndim == 1:
        return {"accuracy": float(hits.mean())}
    video_rate = float(hits.all(axis=1).mean())
    return {"frame_accuracy": float(hits.mean()), "video_accuracy": video_rate,
            "accuracy": video_rate}


# ----------------------------------------------------------------------------- PSNR / SSIM


def psnr(a, b, data_range: float = 2.0) -> tuple[np.ndarray, float]:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` per image, in dB.

    Args:
      a, b: ``[N, H, W, C]`` images or ``[N, F, H, W, C]`` videos of the same shape.
      data_range: max - min of the value range (2 for [-1, 1]).
    Returns:
      ``(values, mean)``: float64 ``[N]`` (``[N, F]`` per frame for videos; ``inf`` where equal)
      and their mean.
    """
    x, y = _as_images(a, "a"), _as_images(b, "b")
    _check_same_shape(x, y, "a", "b")
    _check_data_range(data_range, a=x, b=y)
    mse = np.mean((x - y) ** 2, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(data_range ** 2 / mse)
    return values, float(values.mean())


def _ssim_window_size(height: int, width: int) -> int:
    """11 (Wang et al.) where it fits, else the largest odd size that fits (7 for 8x8 digits)."""
    side = min(11, height, width)
    return side if side % 2 else side - 1


def _gaussian_window(size: int, sigma: float = 1.5) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    window = np.outer(g, g)
    return window / window.sum()


def ssim(a, b, data_range: float = 2.0) -> tuple[np.ndarray, float]:
    """Structural similarity (Wang et al. 2004) per image, channels averaged.

    Gaussian window with sigma 1.5 and size 11, shrunk to the largest odd size that fits the
    image (7 for 8x8 digits, keeping sigma 1.5); local statistics use the normalised window
    weights (population moments) over 'valid' positions only, as in the authors' MATLAB code;
    ``K1 = 0.01``, ``K2 = 0.03``. The per-image value is the mean SSIM map over positions and
    channels.

    Args:
      a, b: ``[N, H, W, C]`` images or ``[N, F, H, W, C]`` videos of the same shape, H, W >= 1.
      data_range: max - min of the value range (2 for [-1, 1]).
    Returns:
      ``(values, mean)``: float64 ``[N]`` (``[N, F]`` per frame for videos) and their mean.
    """
    x, y = _as_images(a, "a"), _as_images(b, "b")
    _check_same_shape(x, y, "a", "b")
    _check_data_range(data_range, a=x, b=y)
    height, width = x.shape[-3], x.shape[-2]
    window = _gaussian_window(_ssim_window_size(height, width))
    size = window.shape[0]

    def local_mean(z):  # [..., H, W, C] -> [..., H-size+1, W-size+1, C]
        patches = np.lib.stride_tricks.sliding_window_view(z, (size, size), axis=(-3, -2))
        return np.einsum("...ij,ij->...", patches, window)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    values = ssim_map.mean(axis=(-3, -2, -1))
    return values, float(values.mean())


# ----------------------------------------------------------------------------- noise prediction


def noise_prediction_mse(eps_a, eps_b) -> np.ndarray:
    """Per-step mean squared difference of two noise-prediction trajectories.

    ``[steps, ...]`` float arrays of the same shape (e.g. float vs quantized model outputs along
    one sampling run) -> float64 ``[steps]``.
    """
    x, y = _as_float64(eps_a, "eps_a"), _as_float64(eps_b, "eps_b")
    _check_same_shape(x, y, "eps_a", "eps_b")
    if x.shape[0] == 0:
        raise ValueError(f"eps_a: expected at least one step, got shape {x.shape}")
    return np.mean((x - y) ** 2, axis=tuple(range(1, x.ndim)))
