"""`cpmgen quantize`: the folder on disk, inspect-ckpt, loading it gives the --quantize model's
tokens, and the errors."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("source", seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_folder_loads_as_the_quantize_option_does(cpmgen_cli, model_dir, prompt_file, tmp_path, kind):
    out = tmp_path / f"q{kind}"
    code, stdout, _ = cpmgen_cli("quantize", model_dir, "--to", kind, "--output", out, "--json")
    assert code == 0
    assert json.loads(stdout)["output"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["chinese_vocab.model", "model.safetensors", "quantized.json"]
    assert (out / "model.safetensors").stat().st_mode == (out / "quantized.json").stat().st_mode
    config = json.loads((out / "quantized.json").read_text())
    assert config["quantize"] == kind and config["num_heads"] == 4 and config["num_layers"] == 2
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        packed = f.get_tensor("transformer.layers.1.mlp.dense_4h_to_h.packed")
        assert "transformer.layers.1.mlp.dense_4h_to_h.weight" not in f.keys()
        assert f.get_tensor("lm_head_quantized.packed").shape == (1008 // 16, 64 // 4, 16, 4)  # int8 head
    assert packed.shape == ((4, 64, 16, 4) if kind == "int8" else (4, 32, 16, 4))  # 64 rows, 256 inputs

    code, stdout, _ = cpmgen_cli("inspect-ckpt", out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["format"] == "quantized" and report["quantize"] == kind
    assert report["num_layers"] == 2 and report["num_heads"] == 4 and report["problems"] == []

    common = ["novel", prompt_file, "--json", "--greedy", "--stride", "8", "--max-new-tokens", "80"]
    code, from_folder, _ = cpmgen_cli(*common, "-m", out)
    assert code == 0
    code, at_load, _ = cpmgen_cli(*common, "-m", model_dir, "--quantize", kind)
    assert code == 0
    assert json.loads(from_folder)["ids"] == json.loads(at_load)["ids"]


def test_quantize_errors(cpmgen_cli, model_dir, prompt_file, tmp_path):
    out = tmp_path / "q"
    code, _, err = cpmgen_cli("quantize", model_dir, "--to", "int2", "--output", out)
    assert code == 2 and err.strip() == "error: --to int2: choose int8 or int4" and not out.exists()
    assert cpmgen_cli("quantize", model_dir, "--to", "int4", "--output", out).code == 0
    code, _, err = cpmgen_cli("quantize", model_dir, "--to", "int8", "--output", out)
    assert code == 2 and "output folder already exists; pass --force" in err
    assert json.loads((out / "quantized.json").read_text())["quantize"] == "int4"  # untouched
    code, _, err = cpmgen_cli("quantize", out, "--to", "int8", "--output", tmp_path / "again")
    assert code == 2 and err.strip() == (f"error: {out}: a quantized folder cannot be resharded, converted or "
                                         "quantized again; use the checkpoint it was made from")
    code, _, err = cpmgen_cli("novel", prompt_file, "-m", out, "--quantize", "int8")
    assert code == 2 and err.strip() == (f"error: --quantize int8: {out} holds int4 weights; drop --quantize "
                                         "or quantize the original checkpoint")
    (out / "model.safetensors").write_bytes(b"not safetensors")
    code, _, err = cpmgen_cli("novel", prompt_file, "-m", out)
    assert code == 2 and err.strip() == (f"error: {out / 'model.safetensors'}: cannot read the weights (missing, "
                                         "corrupt or truncated); quantize the model again")
