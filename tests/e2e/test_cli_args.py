"""CLI argument handling without a server: size units (one parser for the CLI and EngineArgs) and
--chat-template reading a file."""

import logging

import pytest

from fast_inference import cli
from fast_inference.engine.config import EngineArgs
from fast_inference.engine.llm_engine import load_tokenizer
from fast_inference.models.demo import ensure_demo_model
from fast_inference.sizes import parse_memory


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("4096", 4096),
        ("1e6", 10**6),
        ("512B", 512),
        ("2k", 2000),  # regression: the CLI once read a bare K as 1024 while EngineArgs read 1000
        ("2K", 2000),
        ("2KB", 2000),
        ("2Ki", 2048),
        ("2KiB", 2048),
        ("1.5M", 1_500_000),
        ("3MiB", 3 << 20),
        ("2GB", 2 * 10**9),
        ("2 GiB", 2 << 30),
        ("2gi", 2 << 30),
        ("1T", 10**12),
        ("1TiB", 1 << 40),
    ],
)
def test_size_units(text, nbytes):
    assert parse_memory(text) == nbytes


@pytest.mark.parametrize("text", ["", "GiB", "2XB", "-1GiB", "0", "2 G B"])
def test_bad_sizes_name_the_argument(text):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_memory(text)


def test_cli_and_engine_args_agree_on_sizes(tmp_path, caplog):
    # The CLI rejects a bad size before anything loads, with the same parser EngineArgs validates with.
    args = cli._parser().parse_args(["serve", "--model", str(tmp_path), "--kv-cache-memory", "12 parsecs"])
    with caplog.at_level(logging.ERROR):
        assert cli.serve(args) == 2
    assert "kv_cache_memory" in caplog.text and "12 parsecs" in caplog.text
    with pytest.raises(ValueError, match="kv_cache_memory"):
        EngineArgs(model=str(tmp_path), kv_cache_memory="12 parsecs").validate()


def test_chat_template_flag_reads_a_file(tmp_path, caplog):
    missing = tmp_path / "no-such-template.jinja"
    args = cli._parser().parse_args(["serve", "--model", str(tmp_path), "--chat-template", str(missing)])
    with caplog.at_level(logging.ERROR):
        assert cli.serve(args) == 2
    assert "--chat-template" in caplog.text and str(missing) in caplog.text


def test_long_chat_template_reaches_the_tokenizer(tmp_path):
    # Regression: the template text was passed on as if it were a path, and Path(text).is_file() raised
    # OSError (file name too long) for any template longer than the file-system's name limit.
    template = (
        "{% for m in messages %}" + "{# padding #}" * 100 + "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    path = tmp_path / "template.jinja"
    path.write_text(template)
    text = cli._read_chat_template(str(path))
    assert text == template and len(text) > 1000
    tokenizer = load_tokenizer(str(ensure_demo_model(tmp_path / "cache")), text)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<user>hi"
