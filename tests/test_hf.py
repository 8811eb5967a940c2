"""The HF transformers (GPT2LMHeadModel) format: export, import, and the errors on bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpmgen.checkpoint import hf
from cpmgen.errors import UserError
from cpmgen.model import CPMModel

from helpers import TINY

transformers = pytest.importorskip("transformers")


def tiny_model(seed: int = 0) -> CPMModel:
    """A CPMModel with every tensor random and non-trivial (biases, LayerNorm weights too)."""
    torch.manual_seed(seed)
    model = CPMModel(TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny_model(seed).state_dict().items()}


def export(tmp_path: Path, state_dict=None, name: str = "hf") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    hf.write_hf(folder, tiny_state_dict() if state_dict is None else state_dict, TINY)
    return folder


def hf_model(folder: Path):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def random_hf_model(seed: int = 1):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**hf.hf_config(TINY, torch.float32))
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0) + 0.1 * torch.randn_like(p))
    return model


def assert_same_logits(cpm: CPMModel, gpt2) -> None:
    torch.manual_seed(2)
    batch, steps = 3, 20
    ids = torch.randint(0, TINY.vocab_size, (batch, steps))
    with torch.no_grad():
        expected = cpm(ids, torch.arange(steps))
        got = gpt2(input_ids=ids).logits
    assert expected.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def cpm_from(state_dict: dict) -> CPMModel:
    model = CPMModel(TINY).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


# ----------------------------------------------------------------------------- mapping


def test_name_map_covers_cpm_model():
    pairs = hf.name_pairs(TINY.num_layers)
    assert len(pairs) == len(CPMModel(TINY).state_dict()) == 2 + 12 * TINY.num_layers + 2
    assert {m for m, _, _ in pairs} == set(CPMModel(TINY).state_dict())
    assert {h for _, h, _ in pairs} == set(random_hf_model().state_dict()) - {"lm_head.weight"}


def test_megatron_hf_round_trip_is_bitwise():
    sd = tiny_state_dict()
    converted = hf.megatron_to_hf(sd)
    assert converted["transformer.h.1.attn.c_attn.weight"].shape == (64, 192)
    torch.testing.assert_close(converted["transformer.h.1.mlp.c_fc.weight"],
                               sd["transformer.layers.1.mlp.dense_h_to_4h.weight"].t(), atol=0, rtol=0)
    back = hf.hf_to_megatron(converted)
    assert back.keys() == sd.keys()
    for name in sd:
        assert torch.equal(back[name], sd[name]), name


def test_megatron_to_hf_rejects_incomplete_state_dict():
    sd = tiny_state_dict()
    del sd["transformer.layers.0.mlp.dense_4h_to_h.bias"]
    with pytest.raises(ValueError, match="missing tensor transformer.layers.0.mlp.dense_4h_to_h.bias"):
        hf.megatron_to_hf(sd)


# ----------------------------------------------------------------------------- export


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    model = tiny_model()
    folder = export(tmp_path, {k: v.detach().clone() for k, v in model.state_dict().items()})
    assert hf.is_hf_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float32" and config["n_ctx"] == config["n_positions"] == 64
    assert_same_logits(model, hf_model(folder))


def test_export_reads_back_bitwise(tmp_path):
    sd = tiny_state_dict()
    folder = export(tmp_path, sd)
    assert hf.read_hf_config(folder) == {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 1000,
                                         "max_positions": 64, "layernorm_eps": 1e-5}
    back = hf.read_hf_state_dict(folder)
    assert back.keys() == sd.keys()
    for name in sd:
        assert back[name].dtype == sd[name].dtype and torch.equal(back[name], sd[name]), name


def test_export_fp16_keeps_dtype_and_copies_vocab(tmp_path):
    sd = {k: v.half() for k, v in tiny_state_dict().items()}
    vocab = tmp_path / "chinese_vocab.model"
    vocab.write_bytes(b"sentencepiece bytes")
    folder = tmp_path / "hf"
    folder.mkdir()
    hf.write_hf(folder, sd, TINY, vocab=vocab)
    assert (folder / "spiece.model").read_bytes() == b"sentencepiece bytes"
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"
    back = hf.read_hf_state_dict(folder)
    assert all(back[k].dtype == torch.float16 and torch.equal(back[k], sd[k]) for k in sd)


def test_export_missing_vocab(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(UserError) as e:
        hf.write_hf(folder, tiny_state_dict(), TINY, vocab=tmp_path / "nope.model")
    assert str(e.value) == (f"{tmp_path / 'nope.model'}: sentencepiece model not found; "
                            "check the tokenizer path (chinese_vocab.model)")


# ----------------------------------------------------------------------------- import


def test_reads_save_pretrained_safetensors(tmp_path):
    gpt2 = random_hf_model()
    gpt2.save_pretrained(tmp_path / "saved")
    sd = hf.read_hf_state_dict(tmp_path / "saved")
    assert_same_logits(cpm_from(sd), gpt2)
    expected = hf.hf_to_megatron(gpt2.state_dict())
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)


def test_reads_pytorch_model_bin(tmp_path):
    """What save_pretrained(safe_serialization=False) wrote (transformers 4.x; 5.x dropped it): the
    whole state dict with the tied lm_head.weight and, in older versions, the attn mask buffers."""
    gpt2 = random_hf_model()
    folder = tmp_path / "saved"
    try:
        gpt2.save_pretrained(folder, safe_serialization=False)
    except TypeError:
        gpt2.save_pretrained(folder)
    if not (folder / "pytorch_model.bin").exists():
        (folder / "model.safetensors").unlink()
        state = dict(gpt2.state_dict())
        for i in range(TINY.num_layers):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, folder / "pytorch_model.bin")
    assert hf.is_hf_folder(folder) and not (folder / "model.safetensors").exists()
    sd = hf.read_hf_state_dict(folder)
    assert_same_logits(cpm_from(sd), gpt2)
    expected = hf.hf_to_megatron(gpt2.state_dict())
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)


def test_reads_legacy_bin_without_prefix(tmp_path):
    """GPT2Model names (no `transformer.`), in the pre-zip torch.save format that mmap refuses."""
    folder = export(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({k.removeprefix("transformer."): v for k, v in tensors.items()}, folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    sd = hf.read_hf_state_dict(folder)
    assert all(torch.equal(sd[k], v) for k, v in tiny_state_dict().items())


def test_prefers_safetensors(tmp_path):
    folder = export(tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"garbage")
    assert all(torch.equal(hf.read_hf_state_dict(folder)[k], v) for k, v in tiny_state_dict().items())


def test_is_hf_folder(tmp_path):
    assert not hf.is_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not hf.is_hf_folder(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert hf.is_hf_folder(tmp_path)


# ----------------------------------------------------------------------------- bad input


def rewrite_tensors(folder: Path, edit) -> Path:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def user_error(folder: Path, read=hf.read_hf_state_dict) -> str:
    with pytest.raises(UserError) as e:
        read(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_tensor(tmp_path):
    folder = export(tmp_path)
    file = rewrite_tensors(folder, lambda t: [t.pop("transformer.h.1.ln_2.bias"), t.pop("transformer.ln_f.bias")])
    assert user_error(folder) == (f"{file}: missing tensor transformer.h.1.ln_2.bias (and 1 more); "
                                  "the file is incomplete or does not match config.json")


def test_unexpected_tensor(tmp_path):
    folder = export(tmp_path)
    file = rewrite_tensors(folder, lambda t: t.update({"transformer.h.2.ln_1.bias": torch.zeros(64)}))
    assert user_error(folder) == (f"{file}: unexpected tensor transformer.h.2.ln_1.bias; the file is not a "
                                  "CPM-1 GPT2LMHeadModel with n_layer 2 as config.json says")


def test_wrong_shape(tmp_path):
    folder = export(tmp_path)
    file = rewrite_tensors(folder, lambda t: t.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(192, 64)}))
    assert user_error(folder) == (f"{file}: tensor transformer.h.0.attn.c_attn.weight has shape [192, 64], "
                                  "expected [64, 192] from config.json; the weights and config.json disagree")


def test_config_disagrees_with_weights(tmp_path):
    folder = export(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 30000
    (folder / "config.json").write_text(json.dumps(config))
    assert user_error(folder) == (f"{folder / 'model.safetensors'}: tensor transformer.wte.weight has shape "
                                  "[1000, 64], expected [30000, 64] from config.json; the weights and config.json disagree")


def test_untied_lm_head(tmp_path):
    folder = export(tmp_path)
    file = rewrite_tensors(folder, lambda t: t.update({"lm_head.weight": torch.zeros(1000, 64)}))
    assert user_error(folder) == (f"{file}: lm_head.weight differs from transformer.wte.weight, but CPM-1 ties "
                                  "the output layer to the word embedding; this is not a CPM-1 model")


def test_tied_lm_head_is_accepted(tmp_path):
    folder = export(tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].clone()}))
    assert torch.equal(hf.read_hf_state_dict(folder)["word_embeddings.weight"],
                       tiny_state_dict()["word_embeddings.weight"])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, damage):
    folder = export(tmp_path)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    assert user_error(folder) == (f"{file}: cannot read the weights (corrupt or truncated file); "
                                  "download or export the model again")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_bin(tmp_path, damage):
    folder = export(tmp_path)
    (folder / "model.safetensors").unlink()
    file = folder / "pytorch_model.bin"
    torch.save(hf.megatron_to_hf(tiny_state_dict()), file)
    data = file.read_bytes()
    file.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    assert user_error(folder) == (f"{file}: cannot read the weights (corrupt or truncated file); "
                                  "download or export the model again")


def test_bin_with_pickled_objects(tmp_path):
    folder = export(tmp_path)
    (folder / "model.safetensors").unlink()
    file = folder / "pytorch_model.bin"
    torch.save({"weights": hf.megatron_to_hf(tiny_state_dict()), "args": Path("x")}, file)
    assert user_error(folder) == (f"{file}: holds pickled Python objects besides tensors, which could run code "
                                  "and are not loaded; re-save the model with save_pretrained (safetensors)")


def test_no_weights(tmp_path):
    folder = export(tmp_path)
    (folder / "model.safetensors").unlink()
    assert user_error(folder) == (f"{folder}: no model.safetensors or pytorch_model.bin; an HF model folder "
                                  "needs one of them beside config.json")


def write_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config.json").write_text(text)
    return tmp_path / "config.json"


def test_config_not_gelu_new(tmp_path):
    config = hf.hf_config(TINY, torch.float32) | {"activation_function": "gelu"}
    file = write_config(tmp_path, json.dumps(config))
    message = (f"{file}: activation_function is 'gelu', but CPM-1 uses 'gelu_new' (tanh GELU); "
               "this is not a CPM-1 model")
    assert user_error(tmp_path, hf.read_hf_config) == message
    assert user_error(tmp_path) == message


def test_config_bad_json(tmp_path):
    file = write_config(tmp_path, '{"n_layer": 2,')
    assert user_error(tmp_path, hf.read_hf_config) == (
        f"{file}: not valid JSON (Expecting property name enclosed in double quotes at line 1); "
        "restore config.json of the model")


def test_config_missing(tmp_path):
    assert user_error(tmp_path, hf.read_hf_config) == (
        f"{tmp_path / 'config.json'}: not found; an HF model folder needs config.json beside the weights")


def test_config_missing_field(tmp_path):
    config = hf.hf_config(TINY, torch.float32)
    del config["n_head"]
    file = write_config(tmp_path, json.dumps(config))
    assert user_error(tmp_path, hf.read_hf_config) == (
        f"{file}: missing n_head; a CPM-1 config.json needs n_layer, n_embd, n_head, n_positions and vocab_size")


def test_config_n_ctx_fallback_and_other_model_type(tmp_path):
    config = hf.hf_config(TINY, torch.float32)
    del config["n_positions"]
    write_config(tmp_path, json.dumps(config))
    assert hf.read_hf_config(tmp_path)["max_positions"] == 64
    file = write_config(tmp_path, json.dumps(config | {"model_type": "llama"}))
    assert user_error(tmp_path, hf.read_hf_config) == (
        f"{file}: model_type is 'llama', but CPM-1 is a 'gpt2' model; point to a CPM-1 GPT2LMHeadModel folder")
