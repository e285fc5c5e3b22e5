"""Block variance balancing: exact equal total variance, agreement with the batch reference."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.preprocessing import RobustScaler

from streamclust.features.block_balance import BlockBalancer, balance_weights, block_total_variance


@pytest.fixture
def blocks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 600
    phase = (np.arange(n) >= 350).astype(float)  # raster order: a second phase arrives late
    cbed = rng.poisson(20.0 + 30.0 * phase[:, None] * rng.random(256), size=(n, 256)).astype(np.float32)
    eds = rng.poisson(0.4 + 2.0 * phase[:, None] * rng.random(98), size=(n, 98)).astype(np.float32)
    return {"cbed": cbed, "eds": eds}


def _in_batches(bal: BlockBalancer, data: dict[str, np.ndarray], step: int) -> BlockBalancer:
    n = data["cbed"].shape[0]
    for s in range(0, n, step):
        bal.partial_fit({k: v[s : s + step] for k, v in data.items()})
    return bal


def test_balanced_blocks_carry_equal_total_variance(blocks):
    bal = _in_batches(BlockBalancer(), blocks, 64)
    Z = bal.transform(blocks).astype(np.float64)
    v = Z.var(axis=0, ddof=1)
    t_cbed = v[bal.feature_slices_["cbed"]].sum()
    t_eds = v[bal.feature_slices_["eds"]].sum()
    assert t_cbed == pytest.approx(t_eds, rel=1e-5)  # float32 output: float precision
    assert t_cbed == pytest.approx(bal.total_variances_["cbed"], rel=1e-5)
    assert bal.weights_["cbed"] == 1.0 and bal.weights_["eds"] > 1.0


def test_weights_match_sklearn_robust_scaler_and_batch_variance(blocks):
    bal = _in_batches(BlockBalancer(), blocks, 100)
    totals = {}
    for name, X in blocks.items():
        Xs = RobustScaler().fit_transform(X.astype(np.float64))
        totals[name] = Xs.var(axis=0, ddof=1).sum()
    expected = np.sqrt(totals["cbed"] / totals["eds"])
    assert bal.weights_["eds"] == pytest.approx(expected, rel=1e-10)
    for name in blocks:
        assert bal.total_variances_[name] == pytest.approx(totals[name], rel=1e-10)
    # the multiplier is what PCA needs: transform == (x - centre) * multiplier
    raw = bal.concatenate(blocks).astype(np.float64)
    np.testing.assert_allclose(bal.transform(blocks), (raw - bal.center_) * bal.multiplier_, rtol=1e-5, atol=1e-5)


def test_reference_block_and_helpers():
    assert block_total_variance(np.array([1.0, 8.0]), np.array([1.0, 2.0])) == 3.0
    w = balance_weights({"a": 9.0, "b": 1.0, "c": 0.0}, reference="b")
    assert w == {"a": pytest.approx(1 / 3), "b": 1.0, "c": 1.0}
    rng = np.random.default_rng(0)
    data = {"eds": rng.poisson(1.0, (200, 5)).astype(np.float32), "cbed": rng.poisson(9.0, (200, 7)).astype(np.float32)}
    bal = BlockBalancer(blocks=("eds", "cbed"), reference="cbed").partial_fit(data)
    assert bal.weights_["cbed"] == 1.0
    assert bal.feature_slices_ == {"eds": slice(0, 5), "cbed": slice(5, 12)}
    with pytest.raises(ValueError, match="reference"):
        BlockBalancer(reference="haadf").partial_fit(
            {"cbed": data["cbed"], "eds": data["eds"]}
        )


def test_merge_pickle_and_bad_input(blocks):
    whole = _in_batches(BlockBalancer(), blocks, 600)
    a = BlockBalancer().partial_fit({k: v[:250] for k, v in blocks.items()})
    b = BlockBalancer().partial_fit({k: v[250:] for k, v in blocks.items()})
    a += b
    assert a.weights_["eds"] == pytest.approx(whole.weights_["eds"], rel=1e-10)
    np.testing.assert_array_equal(a.center_, whole.center_)
    c = BlockBalancer().merge(whole)
    assert c.n_samples_seen_ == 600
    d = pickle.loads(pickle.dumps(whole))
    np.testing.assert_array_equal(d.transform(blocks), whole.transform(blocks))
    with pytest.raises(ValueError, match="missing"):
        whole.partial_fit({"cbed": blocks["cbed"]})
    with pytest.raises(ValueError, match="same number of rows"):
        whole.partial_fit({"cbed": blocks["cbed"], "eds": blocks["eds"][:10]})
    with pytest.raises(AttributeError):
        BlockBalancer().transform(blocks)


def test_fit_forgets_and_clone(blocks):
    from sklearn.base import clone

    bal = BlockBalancer(scaler_params={"zero_iqr": "std"})
    assert clone(bal).get_params()["scaler_params"] == {"zero_iqr": "std"}
    bal.partial_fit(blocks)
    assert bal.fit({k: v[:100] for k, v in blocks.items()}).n_samples_seen_ == 100
    assert bal.scalers_["eds"].zero_iqr == "std"
