"""Megatron checkpoints in the library: the split rules, reading any mp size, architecture, logits.

The split rules are checked against Megatron's (mpu: column-parallel rows, [q;k;v] per part,
row-parallel columns, vocab-parallel embedding rows), written out independently in conftest's `reference_shard`, not against cpmgen's own table.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cpmgen.checkpoint import megatron, splits
from cpmgen.checkpoint.reader import architecture, open_checkpoint
from cpmgen.checkpoint.writer import write_megatron
from cpmgen.config import Settings
from cpmgen.errors import UserError
from cpmgen.fused_decode import fuse_decode
from cpmgen.loading import load_model, optimize
from cpmgen.model import CPMModel
from cpmgen.synthetic import random_state_dict

from helpers import TINY


# The reference table, name by name (layer tensors for layer 0; layer 1 is the same).
EXPECTED_KINDS = {
    "word_embeddings.weight": splits.ROWS,
    "position_embeddings.weight": splits.REPLICATED,
    "transformer.layers.0.input_layernorm.weight": splits.REPLICATED,
    "transformer.layers.0.input_layernorm.bias": splits.REPLICATED,
    "transformer.layers.0.attention.query_key_value.weight": splits.QKV_ROWS,
    "transformer.layers.0.attention.query_key_value.bias": splits.QKV_ROWS,
    "transformer.layers.0.attention.dense.weight": splits.COLUMNS,
    "transformer.layers.0.attention.dense.bias": splits.REPLICATED,
    "transformer.layers.0.post_attention_layernorm.weight": splits.REPLICATED,
    "transformer.layers.0.post_attention_layernorm.bias": splits.REPLICATED,
    "transformer.layers.0.mlp.dense_h_to_4h.weight": splits.ROWS,
    "transformer.layers.0.mlp.dense_h_to_4h.bias": splits.ROWS,
    "transformer.layers.0.mlp.dense_4h_to_h.weight": splits.COLUMNS,
    "transformer.layers.0.mlp.dense_4h_to_h.bias": splits.REPLICATED,
    "transformer.final_layernorm.weight": splits.REPLICATED,
    "transformer.final_layernorm.bias": splits.REPLICATED,
}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_state_dict(TINY, seed=1)


def settings_for(path) -> Settings:
    settings = Settings()
    settings.model.path = str(path)
    settings.runtime.device = "cpu"
    settings.runtime.dtype = "fp32"
    return settings


def test_state_dict_names_are_the_reference_names(state):
    layer0 = {n for n in state if not n.startswith("transformer.layers.1.")}
    assert layer0 == set(EXPECTED_KINDS)
    assert len(state) == 2 * 12 + 4


def test_split_kind_follows_reference_table(state):
    for name in state:
        assert splits.split_kind(name) == EXPECTED_KINDS[name.replace("layers.1.", "layers.0.")], name
    assert splits.split_dim("transformer.layers.1.attention.dense.weight") == 1
    assert splits.split_dim("transformer.layers.1.mlp.dense_4h_to_h.weight") == 1
    assert splits.split_dim("word_embeddings.weight") == 0
    assert splits.split_dim("transformer.final_layernorm.bias") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mp", [1, 2, 4])
def test_merge_of_shards_is_bitwise_for_every_tensor(state, reference_shard, mp, dtype):
    kinds = set()
    for name, full in state.items():
        full = full.to(dtype)
        shards = [splits.shard(name, full, mp, rank) for rank in range(mp)]
        for rank, piece in enumerate(shards):
            expected = reference_shard(name, full, mp, rank)
            assert piece.dtype == dtype and torch.equal(piece, expected), (name, rank)
        merged = splits.merge(name, [s.clone() for s in shards])
        assert merged.dtype == dtype and merged.shape == full.shape, name
        assert torch.equal(merged, full), name
        kinds.add(splits.split_kind(name))
    assert kinds == {splits.REPLICATED, splits.ROWS, splits.COLUMNS, splits.QKV_ROWS}


@pytest.mark.parametrize("mp", [2, 4])
def test_qkv_rank_rows_are_q_k_v_slices_not_a_contiguous_split(mp):
    """Rank r's fused rows are [q_r; k_r; v_r], each h/mp rows (reference: QKV layout)."""
    h = 8
    labels = torch.cat([1000 + torch.arange(h), 2000 + torch.arange(h), 3000 + torch.arange(h)])  # q, k, v rows
    weight = labels[:, None].float().repeat(1, h)  # [3h, h]: every row holds its label
    bias = labels.float()  # [3h]
    n = h // mp
    for name, full in (("transformer.layers.0.attention.query_key_value.weight", weight),
                       ("transformer.layers.0.attention.query_key_value.bias", bias)):
        shards = [splits.shard(name, full, mp, r) for r in range(mp)]
        for r, piece in enumerate(shards):
            rows = piece[:, 0] if piece.dim() == 2 else piece
            want = [base + i for base in (1000, 2000, 3000) for i in range(r * n, (r + 1) * n)]
            assert rows.tolist() == want, (name, r)
            assert piece.shape[0] == 3 * n
            assert not torch.equal(piece, full.chunk(mp, dim=0)[r])  # not a plain row split
        assert torch.equal(splits.merge(name, shards), full)
        # merging interleaves: a plain concatenation of the shards is not the full tensor
        assert not torch.equal(torch.cat(shards, dim=0), full)


def test_check_split_messages():
    splits.check_split(TINY, 4)  # 4 heads, vocab 1000, 256 MLP units
    for args, mp, message in (
            (TINY, 3, "--mp 3 does not divide the 4 attention heads of DIR; choose a divisor of 4"),
            (dataclasses.replace(TINY, vocab_size=302), 4,
             "--mp 4 does not divide the 302 vocab entries of DIR; choose a divisor of 302"),
            (TINY, 0, "--mp 0: the model-parallel size must be at least 1")):
        with pytest.raises(UserError) as e:
            splits.check_split(args, mp, "DIR")
        assert str(e.value) == message


@pytest.mark.parametrize("mp", [2, 4])
def test_synthetic_rank_files_use_reference_layout(write_ckpt, reference_shard, load_rank_files, state, mp):
    path = write_ckpt(mp=mp, iteration=80000, state=state)
    assert (path / megatron.LATEST_FILE).read_text().strip() == "80000"
    assert sorted(p.name for p in (path / "80000").iterdir()) == [megatron.rank_file_name(r) for r in range(mp)]
    for rank, saved in enumerate(load_rank_files(path / "80000")):
        assert saved["mp_world_size"] == mp and saved["iteration"] == 80000
        assert set(saved["module"]) == set(state)
        for name, full in state.items():
            assert torch.equal(saved["module"][name], reference_shard(name, full, mp, rank)), (name, rank)


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_open_checkpoint_merges_any_mp_bitwise(write_ckpt, reference_shard, state, mp):
    path = write_ckpt(mp=mp, iteration=1234, state=state)
    ckpt = open_checkpoint(path)
    assert (ckpt.format, ckpt.iteration, ckpt.mp, ckpt.problems) == ("megatron", "1234", mp, [])
    assert ckpt.files == [path / "1234" / megatron.rank_file_name(r) for r in range(mp)]
    full = dict(ckpt.full_tensors())
    assert list(full) == list(state)
    for name, tensor in state.items():
        assert ckpt.full_shape(name) == tuple(tensor.shape)
        assert torch.equal(full[name], tensor), name
    for target in (1, 2, 4):
        for rank in range(target):
            for name, tensor in ckpt.rank_tensors(target, rank):
                assert torch.equal(tensor, reference_shard(name, state[name], target, rank)), (name, target, rank)


def test_open_checkpoint_at_the_iteration_folder(write_ckpt, state):
    path = write_ckpt(mp=2, state=state)
    ckpt = open_checkpoint(path / "release")
    assert (ckpt.iteration, ckpt.mp) == ("release", 2)
    assert all(torch.equal(t, state[n]) for n, t in ckpt.full_tensors())


def test_architecture_inferred_from_shapes(write_ckpt):
    """Heads from the stored Megatron args; without them, from the given count or an error."""
    assert architecture(open_checkpoint(write_ckpt("stored", mp=2))) == TINY
    path = write_ckpt(mp=2, with_args=False)
    ckpt = open_checkpoint(path)
    assert architecture(ckpt, 4) == TINY
    with pytest.raises(UserError) as e:
        architecture(ckpt)
    assert str(e.value) == (f"{path}: cannot infer the number of attention heads for hidden size 64 "
                            "(not a public CPM-1 size); pass --set model.num_heads=N")


def test_fp16_checkpoint_keeps_dtype(write_ckpt):
    path = write_ckpt(mp=2, dtype=torch.float16, seed=3)
    expected = random_state_dict(TINY, seed=3, dtype=torch.float16)
    ckpt = open_checkpoint(path)
    assert ckpt.dtype() == torch.float16
    for name, tensor in ckpt.full_tensors():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, expected[name]), name


def _logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids, torch.arange(ids.shape[1]))


def test_mp2_and_merged_mp1_give_the_same_logits(write_ckpt, tmp_path, state):
    mp2 = write_ckpt("mp2", mp=2, state=state)
    ckpt = open_checkpoint(mp2)
    merged = tmp_path / "merged"
    merged.mkdir()
    write_megatron(merged, ckpt, TINY, 1)
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    a = load_model(settings_for(mp2))
    b = load_model(settings_for(merged))
    assert (a.args, b.args) == (TINY, TINY)
    assert open_checkpoint(merged).mp == 1 and ckpt.mp == 2
    logits_a, logits_b = _logits(a, ids), _logits(b, ids)
    assert logits_a.shape == (2, 24, TINY.vocab_size)
    assert torch.equal(logits_a, logits_b)

    # and both are the model of the original state dict
    reference = CPMModel(TINY).eval().requires_grad_(False)
    reference.load_state_dict(state)
    optimize(reference, settings_for(mp2).runtime)  # the same kernels as the loaded models:
    fuse_decode(reference)  # faster linears, then the fused attention (a window's too)
    with torch.no_grad():
        assert torch.equal(reference(ids, torch.arange(24)), logits_a)

    # a different checkpoint gives different logits (the comparison can fail)
    other = load_model(settings_for(write_ckpt("other", mp=2, seed=7)))
    assert not torch.allclose(_logits(other, ids), logits_a)


@pytest.mark.parametrize("as_dict", [False, True])
def test_reshard_keeps_megatron_args_for_the_head_count(write_ckpt, tmp_path, as_dict):
    """Megatron's training args hold the head count of a non-preset hidden size; a reshard keeps
    them (with model_parallel_size updated) so the output loads without --set model.num_heads."""
    import argparse


    folder = write_ckpt("with-args", mp=2)
    stored = {"num_attention_heads": 4, "model_parallel_size": 2, "lr": 1e-4}
    for path in sorted((folder / "release").glob("mp_rank_*")):
        state = torch.load(path, weights_only=False)
        state["args"] = dict(stored) if as_dict else argparse.Namespace(**stored)
        torch.save(state, path)
    ckpt = open_checkpoint(folder)
    out = tmp_path / "out"
    out.mkdir()
    write_megatron(out, ckpt, architecture(ckpt), 4)
    resharded = open_checkpoint(out)
    assert architecture(resharded).num_heads == 4
    kept = resharded.extra[0]["args"]
    kept = kept if as_dict else vars(kept)
    assert kept == {**stored, "model_parallel_size": 4}
    assert resharded.extra[0]["optimizer"] is None


@pytest.mark.parametrize("raised", [ImportError("cannot load module more than once per process"), MemoryError()])
def test_a_failure_of_this_python_is_not_called_a_damaged_rank_file(write_ckpt, monkeypatch, raised):
    """An import or memory failure inside torch.load comes through as itself: telling the user to
    re-copy a good file would send them the wrong way."""
    rank_file = next(write_ckpt("env").rglob("mp_rank_00_model_states.pt"))

    def load(*args, **kwargs):
        raise raised

    monkeypatch.setattr(megatron.torch, "load", load)
    with pytest.raises(type(raised)):
        megatron.load_rank_file(rank_file)


def test_a_damaged_rank_file_error_keeps_what_torch_raised(write_ckpt, monkeypatch):
    rank_file = next(write_ckpt("damaged").rglob("mp_rank_00_model_states.pt"))
    cause = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    def load(*args, **kwargs):
        raise cause

    monkeypatch.setattr(megatron.torch, "load", load)
    with pytest.raises(UserError) as error:
        megatron.load_rank_file(rank_file)
    assert str(error.value) == (f"{rank_file}: cannot read as a PyTorch checkpoint (truncated or not a .pt file: "
                                f"{cause}); re-copy this rank file")
    assert error.value.__cause__ is cause  # shown under --debug
