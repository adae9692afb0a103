"""A corpus of bad inputs (tests/bad_inputs/): each fails with one line naming the file, the
line or row and the key, exit code 2, no traceback, before the model is loaded."""

from pathlib import Path

import pytest

from conftest import run_cli, write_jsonl
from verlite import cli

BAD = Path(__file__).resolve().parent / "bad_inputs"

# (data file, extra overrides, fragments the one-line error must contain)
CASES = [
    ("malformed_line.jsonl", [], ["malformed_line.jsonl:2: malformed JSON", "fix or remove that line"]),
    ("malformed_array.json", [], ["malformed_array.json:2: malformed JSON"]),
    ("question_is_list.jsonl", [], ["question_is_list.jsonl:2: key 'question' must be text, got list"]),
    ("answer_is_null.jsonl", [], ["answer_is_null.jsonl:1: key 'answer' must be text, got NoneType"]),
    ("answer_is_object.jsonl", [], ["answer_is_object.jsonl:1: key 'answer' must be text, got dict"]),
    ("missing_question.jsonl", [], ["missing_question.jsonl:3: missing key 'question' (data.prompt_key)",
                                    "this row has: answer, prompt"]),
    ("missing_answer.jsonl", [], ["missing_answer.jsonl:1: missing key 'answer' (data.response_key)"]),
    ("empty_answer.jsonl", [], ["empty_answer.jsonl:1: key 'answer' is empty"]),
    ("blank_answer.jsonl", [], ["blank_answer.jsonl:1: key 'answer' is empty"]),
    ("empty.jsonl", [], ["empty.jsonl holds no samples"]),
    ("empty_array.json", [], ["empty_array.json holds no samples"]),
    ("number_line.jsonl", [], ["number_line.jsonl:2: expected a JSON object per line, got int"]),
    ("array_with_string.json", [], ["array_with_string.json item 1: expected an object with fields, got str"]),
    ("missing_column.parquet", [], ["missing_column.parquet row 0: missing key 'question'"]),
    ("garbage.parquet", [], ["garbage.parquet: cannot read parquet"]),
    ("latin1.jsonl", [], ["latin1.jsonl: not UTF-8 text", "save it as UTF-8"]),
    ("notes.txt", [], ["notes.txt (data.train_files) must end in .json, .jsonl or .parquet"]),
    ("does_not_exist.jsonl", [], ["data file", "does_not_exist.jsonl does not exist (data.train_files)"]),
    ("long_prompt.jsonl", ["data.max_length=64", "data.truncation=right"],
     ["long_prompt.jsonl:1: no response token is left after truncation to data.max_length=64"]),
    ("too_long.jsonl", ["data.max_length=64"],
     ["too_long.jsonl:2: sample has", "more than data.max_length=64", "data.truncation"]),
    ("messages_not_list.jsonl", ["data.multiturn.enable=true"],
     ["messages_not_list.jsonl:1: key 'messages' must be a non-empty list"]),
    ("messages_no_assistant.jsonl", ["data.multiturn.enable=true"],
     ["messages_no_assistant.jsonl:1: 'messages' has no non-empty assistant message"]),
    ("message_without_role.jsonl", ["data.multiturn.enable=true"],
     ["message_without_role.jsonl:1: messages[0] must be an object with string 'role' and 'content'"]),
    ("missing_messages.jsonl", ["data.multiturn.enable=true"],
     ["missing_messages.jsonl:1: missing key 'messages' (data.multiturn.messages_key)"]),
]


@pytest.mark.parametrize("name, extra, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_data_file(name, extra, fragments, tiny_model, tmp_path, capsys, no_model_load):
    code = cli.main(["sft", f"data.train_files={BAD / name}", f"model.partial_pretrain={tiny_model}",
                     "trainer.device=cpu", f"trainer.default_local_dir={tmp_path}", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("verlite: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not any(tmp_path.iterdir())  # nothing written


def good_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", [{"question": f"{i} + 1?", "answer": f"答案是{i + 1}。"} for i in range(8)])


def test_bad_val_file_and_one_missing_in_a_list(tiny_model, tmp_path, capsys, no_model_load):
    good = good_file(tmp_path)
    code = cli.main(["sft", f"data.train_files=[{good},{BAD / 'does_not_exist.jsonl'}]",
                     f"model.partial_pretrain={tiny_model}", "trainer.device=cpu"])
    assert code == 2 and "does_not_exist.jsonl does not exist (data.train_files)" in capsys.readouterr().err
    code = cli.main(["sft", f"data.train_files={good}", f"data.val_files={BAD / 'missing_question.jsonl'}",
                     f"model.partial_pretrain={tiny_model}", "trainer.device=cpu"])
    assert code == 2 and "missing_question.jsonl:3: missing key 'question'" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["data.micro_batch_size_per_gpu=8", "data.train_batch_size=4"],
     "data.micro_batch_size_per_gpu=8 x 1 process(es) is larger than data.train_batch_size=4"),
    (["model.lora_rank=4", "model.target_modules=[q_proj,nope_proj]"], "model.target_modules: ['nope_proj'] not found"),
    (["trainer.device=cuda"], "trainer.device is cuda but PyTorch sees no GPU"),
    (["data.max_lenght=3"], "unknown config key 'data.max_lenght'; did you mean 'data.max_length'?"),
    (["optim.lr=abc"], "'optim.lr' must be a number, got 'abc'"),
    (["trainer.resume_mode=resume_path", "trainer.resume_from_path=/nowhere"], "/nowhere is not a complete checkpoint"),
])
def test_bad_config_and_environment(args, fragment, tiny_model, tmp_path, capsys):
    import torch

    if "trainer.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = cli.main(["sft", f"data.train_files={good_file(tmp_path)}", f"model.partial_pretrain={tiny_model}",
                     f"trainer.default_local_dir={tmp_path / 'run'}", "data.micro_batch_size_per_gpu=2", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and "\n" not in err, err


def test_model_path_that_does_not_exist(tmp_path, capsys):
    code = cli.main(["sft", f"data.train_files={BAD / 'too_long.jsonl'}", f"model.partial_pretrain={tmp_path}/nope"])
    assert code == 2 and "model path" in capsys.readouterr().err


def test_model_folder_without_a_tokenizer(tmp_path, tiny_model, capsys):
    """transformers 5 builds an empty tokenizer for a folder with config.json alone: every text
    would become no tokens. verlite refuses it in one line before reading any data."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model / "config.json", bare / "config.json")
    code = cli.main(["sft", f"data.train_files={good_file(tmp_path)}", f"model.partial_pretrain={bare}",
                     f"trainer.default_local_dir={tmp_path / 'run'}", "trainer.device=cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{bare} has no tokenizer" in err and "\n" not in err, err


@pytest.mark.parametrize("name", ["malformed_line.jsonl", "missing_column.parquet"])
def test_real_process_exit_code_and_no_traceback(name, tiny_model):
    result = run_cli("sft", f"data.train_files={BAD / name}", f"model.partial_pretrain={tiny_model}",
                     "trainer.device=cpu")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
