"""The checkpoint commands end to end: reshard, convert, inspect-ckpt, and every bad input.

Most commands run in process through cpmgen.cli.main (the console script's entry point, with
its UserError -> `error: ...` / exit 2 handling); the bad-input cases run `python -m cpmgen`
as a subprocess, the faithful way to check exit code, stderr and the absence of a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from cpmgen.checkpoint import megatron
from cpmgen.config import ModelSection
from cpmgen.model import CPMModel
from cpmgen.synthetic import random_state_dict

from helpers import TINY

pytestmark = pytest.mark.usefixtures("cpmgen_env")

# For a reshard to and from mp 3, which TINY does not allow: 6 heads (hidden 96), a vocab divisible by 6
TINY6 = dataclasses.replace(TINY, hidden_size=96, num_heads=6, vocab_size=1002)
RNG_KEYS = ("random_rng_state", "np_rng_state", "torch_rng_state")


def same(a, b) -> bool:
    """Deep equality for checkpoint metadata (tensors, numpy arrays, tuples, dicts)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_written(out: Path, source: Path, src_states: list[dict], out_states: list[dict], mp: int,
                  iteration: str) -> None:
    """The layout and the non-module keys of a written Megatron folder (change_mp.py's rule)."""
    assert (out / megatron.LATEST_FILE).read_text() == (source / megatron.LATEST_FILE).read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted([megatron.LATEST_FILE, iteration])
    assert sorted(p.name for p in (out / iteration).iterdir()) == [megatron.rank_file_name(r) for r in range(mp)]
    assert len(out_states) == mp
    src_mp = len(src_states)
    for rank, state in enumerate(out_states):
        src = src_states[rank * src_mp // mp]  # the source rank this one comes from (or the first merged)
        assert set(state) == set(src), rank
        assert state["mp_world_size"] == mp
        assert same(state["iteration"], src["iteration"])
        for key in RNG_KEYS:
            assert same(state[key], src[key]), (rank, key)
        # Megatron's training args, kept for the head count, with the new model-parallel size
        assert vars(state["args"]) == {**vars(src["args"]), "model_parallel_size": mp}, rank
        for key in set(state) - {"module", "mp_world_size", "iteration", "args", *RNG_KEYS}:
            assert state[key] is None, (rank, key)  # optimizer, lr_scheduler


def check_module(states: list[dict], full: dict[str, torch.Tensor], reference_shard) -> None:
    mp = len(states)
    for rank, state in enumerate(states):
        module = state["module"]
        assert set(module) == set(full)
        for name, tensor in full.items():
            want = reference_shard(name, tensor, mp, rank)
            got = module[name]
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (name, rank)


def assert_user_error(result, message: str | None = None, *, prefix: str | None = None, suffix: str = "") -> None:
    """Exit 2, nothing on stdout, exactly one stderr line `error: ...`, no traceback."""
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ")
    if message is not None:
        assert line == f"error: {message}"
    else:
        assert line.startswith(f"error: {prefix}") and line.endswith(suffix), line


# ----------------------------------------------------------------------------- reshard


def test_reshard_round_trip_1_2_4_1_is_bitwise(write_ckpt, cpmgen_cli, load_rank_files, reference_shard,
                                               tree_snapshot, tmp_path):
    full = random_state_dict(TINY, seed=11)
    source = write_ckpt("ckpt", mp=1, iteration=80000, state=full)
    before = tree_snapshot(source)
    src_states = load_rank_files(source / "80000")

    previous, previous_states = source, src_states
    for mp in (2, 4, 1):
        out = tmp_path / f"step_mp{mp}"
        result = cpmgen_cli("reshard", previous, "--mp", mp, "--output", out)
        assert result.code == 0, result.stderr
        assert f"wrote {out}" in result.stdout
        states = load_rank_files(out / "80000")
        check_written(out, previous, previous_states, states, mp, "80000")
        check_module(states, full, reference_shard)
        previous, previous_states = out, states

    # back at mp 1: every tensor is the original, bitwise, and the metadata is the source's
    final = previous_states[0]
    assert final["iteration"] == 80000 and final["mp_world_size"] == 1
    assert all(same(final[k], src_states[0][k]) for k in RNG_KEYS)
    for name, tensor in full.items():
        assert torch.equal(final["module"][name], tensor), name
    assert tree_snapshot(source) == before  # the source was never touched
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["ckpt", "step_mp1", "step_mp2", "step_mp4"]  # no temporary folders left


def test_reshard_round_trip_2_3_2_is_bitwise(write_ckpt, cpmgen_cli, load_rank_files, reference_shard,
                                             tree_snapshot, tmp_path):
    full = random_state_dict(TINY6, seed=5)
    source = write_ckpt("ckpt", mp=2, args=TINY6, state=full)
    before = tree_snapshot(source)
    src_states = load_rank_files(source / "release")

    result = cpmgen_cli("reshard", source, "--mp", 3, "--output", tmp_path / "mp3")
    assert result.code == 0, result.stderr
    mp3 = load_rank_files(tmp_path / "mp3" / "release")
    check_written(tmp_path / "mp3", source, src_states, mp3, 3, "release")
    check_module(mp3, full, reference_shard)

    result = cpmgen_cli("reshard", tmp_path / "mp3", "--mp", 2, "--output", tmp_path / "back")
    assert result.code == 0, result.stderr
    back = load_rank_files(tmp_path / "back" / "release")
    check_written(tmp_path / "back", tmp_path / "mp3", mp3, back, 2, "release")
    check_module(back, full, reference_shard)
    for rank in range(2):  # the same rank files as the source, tensor by tensor
        for name, tensor in src_states[rank]["module"].items():
            assert torch.equal(back[rank]["module"][name], tensor), (name, rank)
    assert tree_snapshot(source) == before


def test_reshard_default_output_beside_source_and_json(write_ckpt, cpmgen_cli, load_rank_files, tree_snapshot,
                                                       tmp_path):
    source = write_ckpt("model", mp=2, iteration=80000)
    before = tree_snapshot(source)
    result = cpmgen_cli("reshard", source, "--mp", 1, "--json")
    assert result.code == 0, result.stderr
    out = tmp_path / "model_MP1"
    assert json.loads(result.stdout) == {
        "source": str(source), "source_mp": 2, "output": str(out), "mp": 1,
        "files": [str(out / "80000" / megatron.rank_file_name(0))],
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model_MP1"]
    assert (out / megatron.LATEST_FILE).read_text() == "80000\n"
    assert load_rank_files(out / "80000")[0]["mp_world_size"] == 1
    assert tree_snapshot(source) == before


def test_reshard_dot_writes_beside_the_folder_not_inside(write_ckpt, cpmgen_cli, tree_snapshot, monkeypatch,
                                                         tmp_path):
    """`cd MODEL && cpmgen reshard . --mp N` writes ../MODEL_MP<N>, and leaves MODEL untouched."""
    source = write_ckpt("ckpt", mp=2)
    before = tree_snapshot(source)
    monkeypatch.chdir(source)
    result = cpmgen_cli("reshard", ".", "--mp", 1)
    assert result.code == 0, result.stderr
    assert tree_snapshot(source) == before
    assert (tmp_path / "ckpt_MP1" / "release" / megatron.rank_file_name(0)).is_file()


def test_reshard_output_folder_has_ordinary_permissions(write_ckpt, cpmgen_cli, tmp_path):
    """The output folder gets the mode a plain mkdir would, not mkdtemp's private 0700."""
    source = write_ckpt("ckpt", mp=1)
    assert cpmgen_cli("reshard", source, "--mp", 2).code == 0
    out = tmp_path / "ckpt_MP2"
    umask = os.umask(0)
    os.umask(umask)
    for folder in (out, out / "release"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, (folder, oct(folder.stat().st_mode))


def test_reshard_rank_files_hold_only_their_slices(write_ckpt, cpmgen_cli, load_rank_files, tmp_path):
    """Each rank file stores its own slices, not the storage of the whole tensors they are cut from."""
    source = write_ckpt("ckpt", mp=1)
    assert cpmgen_cli("reshard", source, "--mp", 4).code == 0
    folder = tmp_path / "ckpt_MP4" / "release"
    for rank, state in enumerate(load_rank_files(folder)):
        tensor_bytes = sum(t.numel() * t.element_size() for t in state["module"].values())
        size = (folder / megatron.rank_file_name(rank)).stat().st_size
        assert tensor_bytes <= size <= tensor_bytes + 64 * 1024, (rank, size, tensor_bytes)


def test_reshard_force_replaces_existing_output(write_ckpt, cpmgen_cli, load_rank_files, reference_shard, tmp_path):
    full = random_state_dict(TINY, seed=2)
    source = write_ckpt("ckpt", mp=1, state=full)
    out = tmp_path / "ckpt_MP2"
    previous = write_ckpt("older", mp=1, state=random_state_dict(TINY, seed=3))
    assert cpmgen_cli("reshard", previous, "--mp", 2, "-o", out).code == 0

    result = cpmgen_cli("reshard", source, "--mp", 2)
    assert_user_error(result, f"{out}: output folder already exists; pass --force to replace it or choose "
                              "another --output")

    result = cpmgen_cli("reshard", source, "--mp", 2, "--force")
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [megatron.LATEST_FILE, "release"]
    check_module(load_rank_files(out / "release"), full, reference_shard)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt_MP2", "older"]


@pytest.mark.parametrize("force", [False, True])
def test_reshard_interrupted_leaves_nothing_half_written(write_ckpt, cpmgen_cli, tree_snapshot, monkeypatch,
                                                         tmp_path, force):
    source = write_ckpt("ckpt", mp=1)
    out = tmp_path / "out"
    if force:  # an existing output survives a failed --force run intact
        out.mkdir()
        (out / megatron.LATEST_FILE).write_text("previous output")
    before = tree_snapshot(tmp_path)
    real_save = megatron.save_rank_file
    calls = []

    def save_then_interrupt(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(path, state)

    monkeypatch.setattr(megatron, "save_rank_file", save_then_interrupt)
    result = cpmgen_cli("reshard", source, "--mp", 4, "--output", out, *(["--force"] if force else []))
    assert result.code == 130  # Ctrl-C's conventional exit status
    assert "Traceback" not in result.stderr
    assert len(calls) == 2
    assert tree_snapshot(tmp_path) == before  # no output, no temporary folder, source untouched


def test_reshard_refuses_to_overwrite_its_source(write_ckpt, cpmgen_cli, tree_snapshot):
    source = write_ckpt("ckpt", mp=2)
    before = tree_snapshot(source.parent)
    result = cpmgen_cli("reshard", source, "--mp", 1, "--output", source, "--force")
    assert_user_error(result, f"{source}: holds the source checkpoint {source}; choose another --output")
    assert tree_snapshot(source.parent) == before


def test_reshard_keeps_fp16(write_ckpt, cpmgen_cli, load_rank_files, tmp_path):
    source = write_ckpt("ckpt", mp=2, dtype=torch.float16, seed=4)
    full = random_state_dict(TINY, seed=4, dtype=torch.float16)
    assert cpmgen_cli("reshard", source, "--mp", 1, "-o", tmp_path / "one").code == 0
    module = load_rank_files(tmp_path / "one" / "release")[0]["module"]
    for name, tensor in full.items():
        assert module[name].dtype == torch.float16 and torch.equal(module[name], tensor), name


def test_mp2_and_its_reshard_to_mp1_give_the_same_logits(write_ckpt, cpmgen_cli, tmp_path):
    from cpmgen.config import Settings
    from cpmgen.loading import load_model

    source = write_ckpt("ckpt", mp=2, seed=9)
    assert cpmgen_cli("reshard", source, "--mp", 1).code == 0
    ids = torch.randint(0, TINY.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    logits = []
    for path in (source, tmp_path / "ckpt_MP1"):
        settings = Settings()
        settings.model.path = str(path)
        settings.runtime.device, settings.runtime.dtype = "cpu", "fp32"
        loaded = load_model(settings)
        assert loaded.args == TINY
        with torch.no_grad():
            logits.append(loaded.model(ids, torch.arange(32)))
    assert torch.equal(logits[0], logits[1])


# ----------------------------------------------------------------------------- convert


def test_convert_to_hf_matches_transformers_and_back_to_megatron_mp2(write_ckpt, cpmgen_cli, load_rank_files,
                                                                     reference_shard, tmp_path):
    transformers = pytest.importorskip("transformers")
    full = random_state_dict(TINY, seed=3)
    source = write_ckpt("ckpt", mp=2, state=full)
    hf_dir = tmp_path / "hf"
    result = cpmgen_cli("convert", source, "--to", "hf", "--output", hf_dir)
    assert result.code == 0, result.stderr
    assert {"config.json", "model.safetensors"} <= {p.name for p in hf_dir.iterdir()}

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = CPMModel(TINY).eval()
    ours.load_state_dict(full)
    ids = torch.randint(0, TINY.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids, torch.arange(40))
        got = hf_model(input_ids=ids).logits.float()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    back = tmp_path / "back"
    result = cpmgen_cli("convert", "-m", hf_dir, "--to", "megatron", "--mp", 2, "--output", back)
    assert result.code == 0, result.stderr
    assert (back / megatron.LATEST_FILE).read_text() == "release\n"
    states = load_rank_files(back / "release")
    assert [s["mp_world_size"] for s in states] == [2, 2]
    check_module(states, full, reference_shard)
    # the HF config's head count lives on in Megatron's stored args: no --set needed to use it
    assert [s["args"]["num_attention_heads"] for s in states] == [4, 4]
    report = json.loads(cpmgen_cli("inspect-ckpt", back, "--json").stdout)
    assert report["num_heads"] == 4 and report["problems"] == []


def test_hf_export_files_are_0644_and_autotokenizer_is_cpm(write_ckpt, cpmgen_cli, tmp_path):
    """Files readable by others as any new file is (0644 under umask 022), and tokenizer files so
    that transformers' AutoTokenizer gives its CpmTokenizer on the same vocab: same ids for the
    same pieces. transformers 5's CpmTokenizer leaves CPM's jieba cut to the caller (4 did it
    itself), so it is given the cut text, as CPM's own encode makes it."""
    transformers = pytest.importorskip("transformers")
    import jieba

    from cpmgen.tokenizer import CPMTokenizer

    vocab = Path(__file__).resolve().parent.parent / "models" / "cpm-tiny" / "chinese_vocab.model"
    hf_dir = tmp_path / "hf"
    result = cpmgen_cli("convert", "-m", write_ckpt("ckpt"), "--to", "hf", "-o", hf_dir, "--vocab", vocab)
    assert result.code == 0, result.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in hf_dir.iterdir()} == {
        name: 0o666 & ~umask for name in ("config.json", "model.safetensors", "spiece.model",
                                         "tokenizer_config.json", "special_tokens_map.json")}

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert type(hf_tokenizer).__name__ == "CpmTokenizer"
    ours = CPMTokenizer(vocab)
    to_pieces = str.maketrans(" \n", "\u2582\u2583")
    for text in ["今天天气很好，我们去公园散步。", "新华社北京一月五日电 记者报道", "他说：“1998年是关键的一年。”\n第二段",
                 "中国经济增长8.8%，超过预期"]:
        ids = ours.encode(text)
        cut = " ".join(word.translate(to_pieces) for word in jieba.cut(text, cut_all=False))
        assert hf_tokenizer(cut, add_special_tokens=False)["input_ids"] == ids
        assert hf_tokenizer.convert_ids_to_tokens(ids) == ours.pieces(ids)
        assert hf_tokenizer.decode(ids) == ours.decode(ids)
    assert hf_tokenizer.convert_tokens_to_ids("<eod>") == ours.eod_id


# ----------------------------------------------------------------------------- inspect-ckpt

JSON_KEYS = {"format", "iteration", "mp", "num_layers", "hidden_size", "vocab_size", "max_positions",
             "num_params", "dtype", "files", "problems"}


@pytest.mark.parametrize("mp,dtype", [(1, torch.float32), (2, torch.float16), (4, torch.float32)])
def test_inspect_sound_checkpoint(write_ckpt, cpmgen_cli, mp, dtype):
    path = write_ckpt("ckpt", mp=mp, iteration=80000, dtype=dtype)
    result = cpmgen_cli("inspect-ckpt", path, "--json", "--check-values")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert JSON_KEYS <= set(report)
    files = [path / "80000" / megatron.rank_file_name(r) for r in range(mp)]
    assert report["format"] == "megatron"
    assert report["iteration"] == "80000"
    assert report["mp"] == mp
    assert (report["num_layers"], report["hidden_size"], report["vocab_size"], report["max_positions"]) == \
        (2, 64, 1000, 64)
    assert report["num_heads"] == 4
    assert report["num_params"] == TINY.num_params == sum(t.numel() for t in random_state_dict(TINY).values())
    assert report["dtype"] == str(dtype).removeprefix("torch.")
    assert report["files"] == [{"rank": r, "path": str(f), "bytes": f.stat().st_size} for r, f in enumerate(files)]
    assert report["problems"] == []


def test_inspect_text_report_and_unknown_heads(write_ckpt, cpmgen_cli):
    path = write_ckpt("ckpt", mp=2, with_args=False)
    result = cpmgen_cli("inspect-ckpt", path)  # no head count stored or given: shapes are still reported
    assert result.code == 0, result.stderr
    assert "no problems found" in result.stdout
    assert "hidden 64" in result.stdout and "pass --set model.num_heads=N" in result.stdout
    report = json.loads(cpmgen_cli("inspect-ckpt", path, "--json").stdout)
    assert report["num_heads"] is None and report["hidden_size"] == 64 and report["problems"] == []


def test_inspect_hf_folder(write_ckpt, cpmgen_cli, tmp_path):
    source = write_ckpt("ckpt", mp=1)
    assert cpmgen_cli("convert", source, "--to", "hf", "-o", tmp_path / "hf").code == 0
    report = json.loads(cpmgen_cli("inspect-ckpt", tmp_path / "hf", "--json").stdout)
    assert (report["format"], report["iteration"], report["mp"], report["num_heads"]) == ("hf", None, 1, 4)
    assert report["num_params"] == TINY.num_params and report["problems"] == []
    text = cpmgen_cli("inspect-ckpt", "-m", tmp_path / "hf").stdout
    assert "None" not in text and text.splitlines()[0].endswith("format hf, model-parallel size 1")


def _rewrite_rank(path: Path, edit) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)
    edit(state["module"])
    torch.save(state, path)


def _missing_rank(write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    (path / "release" / megatron.rank_file_name(1)).unlink()
    return path, "missing rank file(s) mp_rank_01_model_states.pt (checkpoint has model-parallel size 2)"


def _missing_rank_0(write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    (path / "release" / megatron.rank_file_name(0)).unlink()
    return path, "missing rank file(s) mp_rank_00_model_states.pt (checkpoint has model-parallel size 2)"


def _extra_rank(write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    shutil.copyfile(path / "release" / megatron.rank_file_name(1), path / "release" / megatron.rank_file_name(2))
    return path, "unexpected rank file(s) mp_rank_02_model_states.pt (mp_world_size is 2)"


def _shapes_disagree(write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    name = "transformer.layers.1.mlp.dense_h_to_4h.weight"
    _rewrite_rank(path / "release" / megatron.rank_file_name(1), lambda m: m.__setitem__(name, m[name][:64].clone()))
    return path, f"tensor {name} has shape [128, 64] on rank 0 but [64, 64] on rank 1"


def _only_on_one_rank(write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    name = "transformer.layers.0.attention.dense.bias"
    _rewrite_rank(path / "release" / megatron.rank_file_name(1), lambda m: m.pop(name))
    return path, f"tensor {name} is only in rank 0"


def _missing_tensor(write_ckpt):
    state = random_state_dict(TINY)
    del state["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    return write_ckpt("ckpt", mp=2, state=state), "missing tensor transformer.layers.1.mlp.dense_4h_to_h.bias"


def _unexpected_tensor(write_ckpt):
    state = random_state_dict(TINY)
    state["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    return (write_ckpt("ckpt", mp=2, state=state),
            "unexpected tensor transformer.layers.0.attention.rotary_emb.inv_freq")


def _wrong_full_shape(write_ckpt):
    state = random_state_dict(TINY)
    state["transformer.layers.0.mlp.dense_4h_to_h.bias"] = torch.zeros(32)
    return (write_ckpt("ckpt", mp=1, state=state),
            "tensor transformer.layers.0.mlp.dense_4h_to_h.bias has shape [32], expected [64]")


def _only_a_stray_rank(write_ckpt):
    """No file of a rank below mp_world_size, only one above it (a misnamed copy)."""
    path = write_ckpt("ckpt", mp=2)
    (path / "release" / megatron.rank_file_name(0)).rename(path / "release" / megatron.rank_file_name(2))
    (path / "release" / megatron.rank_file_name(1)).unlink()
    return path, ("missing rank file(s) mp_rank_00_model_states.pt, mp_rank_01_model_states.pt "
                  "(checkpoint has model-parallel size 2)")


PROBLEMS = {
    "missing-rank": _missing_rank,
    "only-a-stray-rank": _only_a_stray_rank,
    "missing-rank-0": _missing_rank_0,
    "extra-rank": _extra_rank,
    "shapes-disagree": _shapes_disagree,
    "only-on-one-rank": _only_on_one_rank,
    "missing-tensor": _missing_tensor,
    "unexpected-tensor": _unexpected_tensor,
    "wrong-shape": _wrong_full_shape,
}


@pytest.mark.parametrize("case", PROBLEMS)
def test_inspect_reports_problem_exit_1(write_ckpt, cpmgen_cli, tree_snapshot, case):
    path, problem = PROBLEMS[case](write_ckpt)
    before = tree_snapshot(path)
    result = cpmgen_cli("inspect-ckpt", path, "--json")
    assert result.code == 1, result.stderr
    report = json.loads(result.stdout)
    assert JSON_KEYS <= set(report)
    assert problem in report["problems"], report["problems"]
    text = cpmgen_cli("inspect-ckpt", path)
    assert text.code == 1 and problem in text.stdout.replace("\n", "")
    assert tree_snapshot(path) == before


def test_inspect_check_values_finds_nan_and_inf(write_ckpt, cpmgen_cli):
    state = random_state_dict(TINY)
    state["transformer.layers.1.attention.dense.weight"][3, 5] = float("nan")  # column 5: rank 0 of 2
    state["transformer.layers.0.mlp.dense_h_to_4h.weight"][200, 1] = float("inf")  # row 200: rank 1 of 2
    path = write_ckpt("ckpt", mp=2, state=state)

    plain = cpmgen_cli("inspect-ckpt", path, "--json")
    assert plain.code == 0 and json.loads(plain.stdout)["problems"] == []

    result = cpmgen_cli("inspect-ckpt", path, "--json", "--check-values")
    assert result.code == 1
    assert sorted(json.loads(result.stdout)["problems"]) == [
        "tensor transformer.layers.0.mlp.dense_h_to_4h.weight on rank 1 holds NaN or Inf values",
        "tensor transformer.layers.1.attention.dense.weight on rank 0 holds NaN or Inf values",
    ]


def test_inspect_missing_folder_exit_2(cpmgen_cli, tmp_path):
    missing = tmp_path / "nope"
    result = cpmgen_cli("inspect-ckpt", missing, "--json")
    assert_user_error(result, f"{missing}: model folder not found; check --model, model.path or $CPMGEN_MODEL")


# ----------------------------------------------------------------------------- bad input (subprocess)
# Each case prepares tmp_path and returns (argv, exact message) or (argv, (prefix, suffix)).


def _bad_missing_folder(tmp_path, write_ckpt):
    missing = tmp_path / "no_such_model"
    return (["reshard", missing, "--mp", 2],
            f"{missing}: model folder not found; check --model, model.path or $CPMGEN_MODEL")


def _bad_missing_latest_file(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=2, iteration=80000)
    (path / megatron.LATEST_FILE).unlink()
    return (["reshard", path, "--mp", 1],
            f"{path}: no latest_checkpointed_iteration.txt; expected a Megatron checkpoint folder "
            "(or an HF folder with config.json)")


def _bad_missing_iteration_folder(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=2, iteration=80000)
    (path / "80000").rename(path / "70000")
    return (["reshard", path, "--mp", 1],
            f"{path}: iteration folder 80000/ named by latest_checkpointed_iteration.txt is missing")


def _bad_missing_rank_file(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    (path / "release" / megatron.rank_file_name(1)).unlink()
    return (["reshard", path, "--mp", 1],
            f"{path / 'release'}: missing rank file(s) mp_rank_01_model_states.pt (checkpoint has model-parallel "
            f"size 2); run cpmgen inspect-ckpt {path}")


def _bad_missing_rank_file_score(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    (path / "release" / megatron.rank_file_name(1)).unlink()
    text = tmp_path / "text.txt"
    text.write_text("你好，世界。", encoding="utf-8")
    return (["score", text, "--model", path, "--device", "cpu"],
            f"{path / 'release'}: missing rank file(s) mp_rank_01_model_states.pt (checkpoint has model-parallel "
            f"size 2); run cpmgen inspect-ckpt {path}")


def _bad_extra_rank_file(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    shutil.copyfile(path / "release" / megatron.rank_file_name(1), path / "release" / megatron.rank_file_name(2))
    return (["reshard", path, "--mp", 1],
            f"{path / 'release'}: unexpected rank file(s) mp_rank_02_model_states.pt (mp_world_size is 2); "
            f"run cpmgen inspect-ckpt {path}")


def _bad_truncated_pt(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    rank1 = path / "release" / megatron.rank_file_name(1)
    data = rank1.read_bytes()
    rank1.write_bytes(data[:len(data) // 2])
    return (["reshard", path, "--mp", 1],
            (f"{rank1}: cannot read as a PyTorch checkpoint (truncated or not a .pt file: ", "); re-copy this rank file"))


def _bad_empty_pt(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    rank0 = path / "release" / megatron.rank_file_name(0)
    rank0.write_bytes(b"")
    return (["reshard", path, "--mp", 2],
            f"{rank0}: empty file, not a PyTorch checkpoint; re-copy this rank file")


def _bad_pt_of_a_list(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    rank0 = path / "release" / megatron.rank_file_name(0)
    torch.save([1, 2, 3], rank0)
    return (["reshard", path, "--mp", 2],
            f"{rank0}: not a Megatron model checkpoint (no 'module' state dict; found list)")


def _bad_pt_without_module(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    rank0 = path / "release" / megatron.rank_file_name(0)
    torch.save({"model": random_state_dict(TINY), "iteration": 5}, rank0)
    return (["reshard", path, "--mp", 2],
            f"{rank0}: not a Megatron model checkpoint (no 'module' state dict; found model, iteration)")


def _bad_config_disagrees(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=2)
    return (["reshard", path, "--mp", 1, "--set", "model.hidden_size=128"],
            f"config model.hidden_size=128 disagrees with the checkpoint {path}, which has hidden_size 64; "
            "fix the config or the --model path")


def _bad_heads_unknown(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=2, with_args=False)  # no stored Megatron args, a non-preset hidden size
    return (["reshard", path, "--mp", 1],
            f"{path}: cannot infer the number of attention heads for hidden size 64 (not a public CPM-1 size); "
            "pass --set model.num_heads=N")


def _bad_mp_not_dividing_heads(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    return (["reshard", path, "--mp", 3],
            f"--mp 3 does not divide the 4 attention heads of {path}; choose a divisor of 4")


def _bad_mp_not_dividing_vocab(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1, args=dataclasses.replace(TINY, vocab_size=302))
    return (["reshard", path, "--mp", 4],
            f"--mp 4 does not divide the 302 vocab entries of {path}; choose a divisor of 302")


def _bad_mp_zero(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    return (["reshard", path, "--mp", 0], "--mp 0: the model-parallel size must be at least 1")


def _bad_existing_output(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    out = tmp_path / "ckpt_MP2"
    out.mkdir()
    (out / "mine.txt").write_text("do not replace")
    return (["reshard", path, "--mp", 2],
            f"{out}: output folder already exists; pass --force to replace it or choose another --output")


def _bad_existing_output_convert(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    (path / "chinese_vocab.model").write_bytes(b"not read before the output check")  # no missing-vocab warning
    out = tmp_path / "hf"
    out.mkdir()
    return (["convert", path, "--to", "hf", "--output", out],
            f"{out}: output folder already exists; pass --force to replace it or choose another --output")


def _bad_non_utf8_text(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    text = tmp_path / "gbk.txt"
    text.write_bytes("你好，世界".encode("gbk"))
    return (["score", text, "--model", path, "--device", "cpu"],
            f"{text}: input file is not valid UTF-8 (byte 0); convert it, e.g. iconv -f GBK -t UTF-8")


def _bad_unknown_set_key(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    valid = ", ".join(f"model.{f.name}" for f in dataclasses.fields(ModelSection))
    assert "model.num_heads" in valid and "model.hidden_size" in valid
    return (["reshard", path, "--mp", 2, "--set", "model.num_head=4"],
            f"--set model.num_head=4: unknown key model.num_head; valid keys: {valid}")


def _bad_convert_target(tmp_path, write_ckpt):
    path = write_ckpt("ckpt", mp=1)
    return (["convert", path, "--to", "onnx", "--output", tmp_path / "out"],
            "--to onnx: choose hf or megatron")


BAD_INPUTS = {
    "missing-folder": _bad_missing_folder,
    "missing-latest-file": _bad_missing_latest_file,
    "missing-iteration-folder": _bad_missing_iteration_folder,
    "missing-rank-file": _bad_missing_rank_file,
    "missing-rank-file-score": _bad_missing_rank_file_score,
    "extra-rank-file": _bad_extra_rank_file,
    "truncated-pt": _bad_truncated_pt,
    "empty-pt": _bad_empty_pt,
    "pt-of-a-list": _bad_pt_of_a_list,
    "pt-without-module": _bad_pt_without_module,
    "config-disagrees": _bad_config_disagrees,
    "heads-unknown": _bad_heads_unknown,
    "mp-not-dividing-heads": _bad_mp_not_dividing_heads,
    "mp-not-dividing-vocab": _bad_mp_not_dividing_vocab,
    "mp-zero": _bad_mp_zero,
    "existing-output": _bad_existing_output,
    "existing-output-convert": _bad_existing_output_convert,
    "non-utf8-text": _bad_non_utf8_text,
    "convert-target": _bad_convert_target,
    "unknown-set-key": _bad_unknown_set_key,
}


# The real console script in a fresh interpreter for a few cases (about 1.5 s each); the
# in-process runner above goes through the same cpmgen.cli.main for all of them.
SUBPROCESS_CASES = ["missing-folder", "truncated-pt", "non-utf8-text", "unknown-set-key"]


def _check_bad_input(case, tmp_path, write_ckpt, run, tree_snapshot) -> None:
    argv, expected = BAD_INPUTS[case](tmp_path, write_ckpt)
    before = tree_snapshot(tmp_path)
    result = run(*argv)
    if isinstance(expected, tuple):
        assert_user_error(result, prefix=expected[0], suffix=expected[1])
    else:
        assert_user_error(result, expected)
    assert tree_snapshot(tmp_path) == before  # nothing written, nothing touched


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exit_2_one_line_nothing_written(case, tmp_path, write_ckpt, cpmgen_cli, tree_snapshot):
    _check_bad_input(case, tmp_path, write_ckpt, cpmgen_cli, tree_snapshot)


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_via_python_m_cpmgen(case, tmp_path, write_ckpt, cpmgen_subprocess, tree_snapshot):
    _check_bad_input(case, tmp_path, write_ckpt, cpmgen_subprocess, tree_snapshot)


@pytest.mark.slow
def test_inspect_via_python_m_cpmgen_exit_1(write_ckpt, cpmgen_subprocess):
    path, problem = _missing_rank(write_ckpt)
    result = cpmgen_subprocess("inspect-ckpt", path, "--json")
    assert result.code == 1 and "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["mp"] == 2 and report["problems"] == [problem]
    assert [f["rank"] for f in report["files"]] == [0]


def test_convert_without_vocab_warns_on_one_line(write_ckpt, cpmgen_cli, tmp_path, monkeypatch):
    """A warning is one line in a log, however long (stderr is not a terminal here)."""
    monkeypatch.setenv("COLUMNS", "80")  # the width rich assumes for a pipe
    source = write_ckpt("ckpt", mp=1)
    result = cpmgen_cli("convert", source, "--to", "hf", "--output", tmp_path / "hf")
    assert result.code == 0
    assert result.stderr.splitlines() == [
        "warning: no chinese_vocab.model found: the HF folder will have no spiece.model (pass --vocab)"]
