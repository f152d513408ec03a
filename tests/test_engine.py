"""Running models: device choice, batching, progress and cancellation."""

import numpy as np
import pytest
import torch

from napari_cryoswan.engine import Cancelled, choose_device, map_batches, reconstruct
from napari_cryoswan.models.registry import build_model


def test_auto_device_falls_back_to_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device("auto").type == expected
    assert choose_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            choose_device("cuda")
    with pytest.raises(ValueError, match="Unknown device"):
        choose_device("tpu")


def test_batched_reconstruction_matches_one_pass_and_reports_progress():
    torch.manual_seed(0)
    model = build_model("swan", preset="small").eval()
    volumes = np.random.default_rng(0).normal(size=(5, 64, 64, 64)).astype(np.float32)
    seen = []
    out = reconstruct(model, volumes, torch.device("cpu"), batch_size=2,
                      progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert list(out) == ["RQ1+RQ2", "RQ2"] and out["RQ1+RQ2"].shape == (5, 64, 64, 64)
    whole = model.reconstruct(torch.from_numpy(volumes[:, None]))[:, 0].numpy()
    np.testing.assert_allclose(out["RQ1+RQ2"], whole, rtol=1e-4, atol=1e-4)


def test_cancel_between_batches():
    calls = []
    stop_after_first = lambda: len(calls) >= 1  # noqa: E731

    def record(x):
        calls.append(x.shape[0])
        return x

    with pytest.raises(Cancelled):
        map_batches(record, np.zeros((6, 4, 4, 4)), torch.device("cpu"), batch_size=2,
                    should_stop=stop_after_first)
    assert calls == [2]
