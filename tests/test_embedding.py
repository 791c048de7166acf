"""CompressedEmbedding / CompressedEmbeddingBag give bit-identical results to
torch.nn.Embedding / EmbeddingBag for every argument they accept."""
import io
import itertools
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from ibp import datasets
from ibp.integrations.embedding import CompressedEmbedding, CompressedEmbeddingBag

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("sum", "mean", "max")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def table(rows, dim, dtype, seed=0):
    """A table with repeated rows, -0.0, inf and subnormals among normal values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g).to(dtype)
    w[1] = w[0]
    w[2, :3] = torch.tensor([-0.0, float("inf"), torch.finfo(dtype).tiny / 2])
    return w


def bags(rows, n, nbags, seed=1, padding_idx=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rows, (n,), generator=g)
    if padding_idx is not None:
        ids[::5] = padding_idx
    offsets = torch.sort(torch.randint(0, n, (nbags,), generator=g)).values
    offsets[0] = 0
    offsets[3] = offsets[4]  # an empty bag
    return ids, offsets


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_idx", [None, 7, -1])
@pytest.mark.parametrize("dim", [37, 64])
def test_bag_matches_torch(dtype, mode, padding_idx, dim):
    ref = nn.EmbeddingBag.from_pretrained(table(200, dim, dtype), mode=mode, padding_idx=padding_idx)
    ours = CompressedEmbeddingBag.from_module(ref)
    pad = None if padding_idx is None else padding_idx % 200
    ids, offsets = bags(200, 600, 50, padding_idx=pad)
    psw = torch.rand(600, generator=torch.Generator().manual_seed(2)).to(dtype) if mode == "sum" else None
    for last in (False, True):
        ref.include_last_offset = last
        ours = CompressedEmbeddingBag.from_module(ref)
        assert_bits_equal(ours(ids, offsets), ref(ids, offsets))
        assert_bits_equal(ours(ids, offsets, psw), ref(ids, offsets, psw))
    assert_bits_equal(ours(ids.view(60, 10)), ref(ids.view(60, 10)))
    assert_bits_equal(ours(ids.int(), offsets.int()), ref(ids.int(), offsets.int()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_matches_torch(dtype, padding_idx):
    ref = nn.Embedding.from_pretrained(table(300, 24, dtype), padding_idx=padding_idx)
    ours = CompressedEmbedding.from_module(ref)
    ids = torch.randint(0, 300, (7, 11), generator=torch.Generator().manual_seed(3))
    for x in (ids, ids[0], ids[0, 0], ids.int(), ids[:0], ids.t()):
        assert_bits_equal(ours(x), ref(x))


def test_bag_every_padding_and_empty_input():
    ref = nn.EmbeddingBag.from_pretrained(table(20, 8, torch.float32), mode="mean", padding_idx=4)
    ours = CompressedEmbeddingBag.from_module(ref)
    ids = torch.full((6,), 4)
    offsets = torch.tensor([0, 2, 2])
    assert_bits_equal(ours(ids, offsets), ref(ids, offsets))
    empty = torch.zeros(0, dtype=torch.long)
    assert_bits_equal(ours(empty, offsets[:1] * 0), ref(empty, offsets[:1] * 0))


def test_default_construction_draws_the_same_weights_as_torch():
    for cls, ref_cls, kw in ((CompressedEmbedding, nn.Embedding, {"padding_idx": 2}),
                             (CompressedEmbeddingBag, nn.EmbeddingBag, {"padding_idx": 2, "mode": "sum"})):
        torch.manual_seed(5)
        ref = ref_cls(50, 12, **kw)
        torch.manual_seed(5)
        ours = cls(50, 12, **kw)
        assert_bits_equal(ours.decompress(), ref.weight.detach())
        assert not ours.decompress()[2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_max_norm_renormalises_like_torch(dtype, norm_type):
    weight = table(60, 16, dtype) * 3
    weight[2] = 1.0  # keep the special values out of the norms
    ref = nn.EmbeddingBag.from_pretrained(weight, mode="sum", max_norm=2.5, norm_type=norm_type)
    ours = CompressedEmbeddingBag.from_module(ref)
    ids, offsets = bags(60, 90, 9)
    with torch.no_grad():
        want = ref(ids, offsets)
    assert_bits_equal(ours(ids, offsets), want)
    assert_bits_equal(ours.decompress(), ref.weight.detach())
    ref = nn.Embedding.from_pretrained(weight, max_norm=2.5, norm_type=norm_type)
    ours = CompressedEmbedding.from_module(ref)
    with torch.no_grad():
        want = ref(ids[:40])
    assert_bits_equal(ours(ids[:40]), want)
    assert_bits_equal(ours.decompress(), ref.weight.detach())


def test_update_rows_is_seen_by_later_lookups():
    weight = table(100, 20, torch.float32)
    ours = CompressedEmbeddingBag.from_pretrained(weight, mode="max")
    ids, offsets = bags(100, 300, 30)
    before = ours(ids, offsets)
    rows = torch.tensor([5, 99, 0, 5])
    values = torch.randn(4, 20, generator=torch.Generator().manual_seed(9)).double()
    ours.update_rows(rows, values)
    expected = weight.clone()
    expected[[99, 0, 5]] = values[[1, 2, 3]].float()  # repeated rows: the last value wins
    ref = nn.EmbeddingBag.from_pretrained(expected, mode="max")
    assert_bits_equal(ours.decompress(), expected)
    assert_bits_equal(ours(ids, offsets), ref(ids, offsets))
    assert not torch.equal(before, ours(ids, offsets))
    ours.update_rows([3], 0.5)  # broadcast, as weight[[3]] = 0.5
    assert torch.equal(ours.decompress()[3], torch.full((20,), 0.5))
    assert weight.equal(table(100, 20, torch.float32))  # the caller's weight is untouched


def test_state_dict_interchanges_with_torch():
    ref = nn.Embedding(40, 6, padding_idx=1)
    ours = CompressedEmbedding(40, 6, padding_idx=1)
    ours.load_state_dict(ref.state_dict())
    assert_bits_equal(ours.decompress(), ref.weight.detach())
    other = nn.Embedding(40, 6)
    other.load_state_dict(ours.state_dict())
    assert_bits_equal(other.weight.detach(), ref.weight.detach())
    with pytest.raises(RuntimeError, match="size mismatch"):
        ours.load_state_dict(nn.Embedding(41, 6).state_dict())
    assert list(ours.parameters()) == []
    extra = {**ref.state_dict(), "bias": torch.zeros(6)}
    results = []
    for module in (nn.Embedding(40, 6), CompressedEmbedding(40, 6)):   # strict, as torch is
        with pytest.raises(RuntimeError, match='Unexpected key.*"bias"'):
            module.load_state_dict(extra)
        results.append(module.load_state_dict(extra, strict=False))
    assert results[0] == results[1]
    outer = nn.Sequential(CompressedEmbedding(40, 6))
    with pytest.raises(RuntimeError, match='Unexpected key.*"0.scale"'):
        outer.load_state_dict({"0.weight": ref.weight, "0.scale": torch.ones(1)})


def test_bad_arguments_raise_clear_errors():
    weight = table(10, 4, torch.float32)
    bag = CompressedEmbeddingBag.from_pretrained(weight, mode="sum")
    with pytest.raises(IndexError):
        bag(torch.tensor([10]), torch.tensor([0]))
    with pytest.raises(IndexError):
        bag(torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(TypeError):
        bag(torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(ValueError):
        bag(torch.tensor([1, 2]))  # 1-D input needs offsets, as in torch
    with pytest.raises(ValueError, match="frozen"):
        CompressedEmbedding.from_pretrained(weight, freeze=False)
    with pytest.raises(ValueError, match="frozen"):
        CompressedEmbeddingBag.from_module(nn.EmbeddingBag(3, 2), freeze=False)
    with pytest.raises(TypeError):
        CompressedEmbedding.from_module(nn.EmbeddingBag(3, 2))
    with pytest.raises(TypeError):
        CompressedEmbeddingBag.from_module(nn.Embedding(3, 2))
    with pytest.raises(ValueError):
        CompressedEmbedding(10, 4, padding_idx=10)
    with pytest.raises(ValueError):
        CompressedEmbeddingBag(10, 4, mode="median")
    with pytest.raises(ValueError):
        CompressedEmbedding(10, 5, _weight=weight)
    with pytest.raises(ValueError):
        CompressedEmbedding.from_pretrained(weight[0])
    with pytest.raises(IndexError):
        bag.update_rows([10], torch.zeros(1, 4))
    with pytest.raises(TypeError):
        bag.update_rows([1.5], torch.zeros(1, 4))


def test_table_is_compressed_and_slotted():
    bag = CompressedEmbeddingBag.from_pretrained(table(64, 32, torch.bfloat16))
    assert bag.table.layout == "slotted"
    assert bag.table.is_pinned() == torch.cuda.is_available()
    assert repr(bag) == "CompressedEmbeddingBag(64, 32, dtype=bfloat16, mode='mean')"


@pytest.mark.slow
def test_glove_table_matches_torch():
    weight = torch.from_numpy(datasets.load("glove-50d")["glove.6B.50d"][:20000].copy())
    ids, offsets = bags(20000, 4000, 256, seed=4, padding_idx=0)
    for mode, padding_idx in itertools.product(MODES, (None, 0)):
        ref = nn.EmbeddingBag.from_pretrained(weight, mode=mode, padding_idx=padding_idx)
        ours = CompressedEmbeddingBag.from_module(ref)
        assert_bits_equal(ours(ids, offsets), ref(ids, offsets))
    ref = nn.Embedding.from_pretrained(weight)
    assert_bits_equal(CompressedEmbedding.from_module(ref)(ids.view(40, 100)), ref(ids.view(40, 100)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.gpu
@needs_cuda
def test_gpu_bag_matches_torch_on_gpu(mode, dtype):
    ref = nn.EmbeddingBag.from_pretrained(table(5000, 64, dtype), mode=mode, padding_idx=3).cuda()
    ours = CompressedEmbeddingBag.from_module(ref)
    assert ours.table.is_pinned()
    ids, offsets = bags(5000, 3000, 200, padding_idx=3)
    ids, offsets = ids.cuda(), offsets.cuda()
    assert_bits_equal(ours(ids, offsets), ref(ids, offsets))
    assert_bits_equal(ours(ids.view(300, 10)), ref(ids.view(300, 10)))
    if mode == "sum":
        psw = torch.rand(3000, device="cuda").to(dtype)
        assert_bits_equal(ours(ids, offsets, psw), ref(ids, offsets, psw))


@pytest.mark.gpu
@needs_cuda
def test_gpu_lookups_see_updates_and_max_norm():
    weight = table(1000, 48, torch.float32) * 3
    weight[2] = 1.0
    ref = nn.Embedding.from_pretrained(weight.clone(), max_norm=4.0).cuda()
    ours = CompressedEmbedding.from_module(ref)
    ids = torch.randint(0, 1000, (64, 8), device="cuda")
    with torch.no_grad():
        want = ref(ids)
    assert_bits_equal(ours(ids), want)
    assert_bits_equal(ours.decompress(), ref.weight.detach().cpu())
    ours.update_rows(torch.arange(10), torch.zeros(10, 48))
    with torch.no_grad():
        ref.weight[:10] = 0
    assert_bits_equal(ours(ids), ref(ids))


@pytest.mark.slow
def test_example_runs():
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "examples" / "embedding_bag.py")], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "equal to nn.EmbeddingBag's" in done.stdout


def saved(module):
    import io
    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()


def restored(data):
    import io
    return torch.load(io.BytesIO(data), weights_only=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [37, 64])
def test_torch_save_gives_back_an_equal_working_module(dtype, dim):
    weight = table(300, dim, dtype)
    bag = CompressedEmbeddingBag.from_pretrained(weight, mode="max", padding_idx=4)
    bag.update_rows([9, 299], torch.zeros(2, dim))                   # an updated table travels as it is now
    back = restored(saved(bag))
    assert type(back) is CompressedEmbeddingBag and repr(back) == repr(bag)
    assert back.table.layout == "slotted" and back.table.model == bag.table.model
    assert back.table.kinds.tobytes() == bag.table.kinds.tobytes()          # slot for slot the same table
    assert back.table.payload.tobytes() == bag.table.payload.tobytes()
    ids, offsets = bags(300, 500, 40, padding_idx=4)
    assert_bits_equal(back(ids, offsets), bag(ids, offsets))
    back.update_rows([1], torch.ones(1, dim))                       # still a working, updatable table
    assert bag.decompress()[1].equal(weight[1]) and back.decompress()[1].equal(torch.ones(dim, dtype=dtype))
    emb = CompressedEmbedding.from_pretrained(weight, padding_idx=4)
    assert_bits_equal(restored(saved(emb))(ids.view(20, 25)), emb(ids.view(20, 25)))


@pytest.mark.slow
def test_torch_save_of_glove_is_about_its_compressed_size():
    import ibp
    weight = torch.from_numpy(datasets.load("glove-50d")["glove.6B.50d"].copy())     # 400000 x 50, 80 MB
    bag = CompressedEmbeddingBag.from_pretrained(weight, mode="sum")
    data = saved(bag)
    packed = ibp.compress(weight).nbytes
    assert len(data) < packed + (1 << 16) and len(data) < 0.9 * weight.nbytes    # 114.7 MB before
    back = restored(data)
    assert back.table.payload.tobytes() == bag.table.payload.tobytes()
    assert "weight" in bag.state_dict() and bag.state_dict()["weight"].equal(weight)   # torch's entry, decoded


class BagRows(torch.utils.data.Dataset):
    """Rows looked up in a worker: the bag goes to it pickled."""

    def __init__(self, bag):
        self.bag = bag

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return self.bag(torch.tensor([[i, (i * 7) % 50]]))[0]


class BagsRows(BagRows):
    """Rows of three bags, as a recommender looks up several tables."""

    def __init__(self, bags):
        self.bags = bags

    def __getitem__(self, i):
        return torch.cat([bag(torch.tensor([[i, (i * 7) % 50]]))[0] for bag in self.bags])


def test_spawned_dataloader_workers_receive_working_bags():
    # the tables went pickled as tensors dropped at once; a spawned worker inherits their shared memory's
    # file descriptors only when it starts, after that: the workers died ("unable to resize file")
    bags = [CompressedEmbeddingBag.from_pretrained(torch.randn(50, 8), mode="sum") for _ in range(3)]
    want = torch.stack([BagsRows(bags)[i] for i in range(12)])
    loader = torch.utils.data.DataLoader(BagsRows(bags), batch_size=4, num_workers=2, multiprocessing_context="spawn")
    assert torch.equal(torch.cat(list(loader)), want)
    buf = io.BytesIO()
    torch.save(bags[0], buf)   # a table kept for a spawn is not saved with the next
    buf.seek(0)
    assert "_pickled" not in torch.load(buf, weights_only=False).__dict__
