"""`frugal quantize` and `--quantization` on the engine commands."""

from __future__ import annotations

import json

from frugal.cli.main import main


def test_quantize_cli_writes_a_loadable_checkpoint(stories260k, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["quantize", str(stories260k), str(out), "--bits", "8", "--lm-head-bits", "16"]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 8 and config["lm_head_bits"] == 16 and config["quant_method"] == "frugal"
    capsys.readouterr()
    assert main(["generate", "Once upon a time", "--model", str(out), "--max-tokens", "8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(record["token_ids"]) == 8


def test_quantize_cli_reports_user_errors(stories260k, tmp_path, capsys):
    assert main(["quantize", str(stories260k), str(stories260k), "--bits", "4"]) == 2
    assert "must differ" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "out"), "--bits", "4"]) == 2
    assert main(["quantize", str(stories260k), str(tmp_path / "o"), "--bits", "8", "--group-size", "32"]) == 2
    assert "group_size" in capsys.readouterr().err


def test_generate_with_quantization_flag(stories260k, capsys):
    assert main(["generate", "Once upon a time", "--model", str(stories260k), "--quantization", "int4",
                 "--max-tokens", "6", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]) == 6
