"""unit_rows=1: one row per unit, so a gather reads only the rows it asks for."""
import numpy as np
import pytest

import ibp
from ibp import datasets


def test_one_row_per_unit_on_short_rows():
    x = np.random.default_rng(0).standard_normal((1000, 50)).astype(np.float32)
    grouped, single = ibp.compress(x), ibp.compress(x, unit_rows=1)
    assert grouped.geometry.unit_words > grouped.geometry.row_words   # 200-byte rows are grouped by default
    assert single.geometry.unit_words == single.geometry.row_words
    assert single.geometry.nunits == x.shape[0]
    idx = np.array([5, 999, 0, 5, -1])
    assert ibp.decompress(single, index=idx).tobytes() == x[idx].tobytes()
    assert ibp.decompress(single).tobytes() == x.tobytes()
    back = ibp.CompressedTensor.from_bytes(single.to_bytes())
    assert back.geometry.unit_words == single.geometry.unit_words
    assert ibp.decompress(back, index=idx).tobytes() == x[idx].tobytes()


def test_unit_rows_groups_as_asked_and_long_rows_still_split():
    x = np.arange(30 * 8, dtype=np.uint16).reshape(30, 8)
    ct = ibp.compress(x, unit_rows=4, layout="slotted")
    assert ct.geometry.unit_words * ct.word_bits == 4 * 8 * 16
    ct.update_rows([29], x[[0]])
    want = x.copy()
    want[29] = x[0]
    assert ibp.decompress(ct).tobytes() == want.tobytes()
    long = np.zeros((2, 1 << 15), np.float32)
    assert ibp.compress(long, unit_rows=1).geometry.unit_words < long.shape[1]


@pytest.mark.parametrize("bad", [0, -1, 1.0, True, "1"])
def test_unit_rows_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError):
        ibp.compress(np.zeros((4, 4), np.float32), unit_rows=bad)


@pytest.mark.slow
def test_gather_tables_cost_little_ratio_on_real_embeddings():
    x = datasets.load("glove-50d")["glove.6B.50d"][:100_000]
    grouped, single = ibp.compress(x), ibp.compress(x, model=ibp.analyze(x), unit_rows=1)
    assert single.ratio > 0.98 * grouped.ratio
    idx = np.random.default_rng(1).integers(0, len(x), 5000)
    assert ibp.decompress(single, index=idx).tobytes() == x[idx].tobytes()


def test_gather_integrations_store_one_row_per_unit():
    torch = pytest.importorskip("torch")
    from ibp.integrations.embedding import CompressedEmbedding
    from ibp.integrations.gnn import CompressedFeatureStore
    weight = torch.randn(500, 40)
    emb = CompressedEmbedding.from_pretrained(weight)
    assert emb.table.geometry.unit_words == emb.table.geometry.row_words
    store = CompressedFeatureStore()
    store.put_tensor(weight, group_name="paper", attr_name="x", index=None)
    ct = store.compressed(group_name="paper", attr_name="x")
    assert ct.geometry.unit_words == ct.geometry.row_words
    assert torch.equal(store.get_tensor(group_name="paper", attr_name="x", index=torch.tensor([3, 499])),
                       weight[[3, 499]])
