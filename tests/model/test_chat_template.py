"""Chat templates: parity with HF `apply_chat_template(tokenize=False)` and clear errors.

The shared qwen2.5-bpe directory carries no chat template, so the Qwen2.5-Instruct template (from
its tokenizer_config.json, Apache-2.0) is written into a temporary model directory next to a link to
the real tokenizer.json; both frugal and transformers load that directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frugal.errors import InvalidRequestError
from frugal.model.chat_template import render_chat_template
from frugal.model.tokenizer import load_tokenizer

from tiny_models import QWEN25_TEMPLATE  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
QWEN = SHARED / "models" / "tokenizers" / "qwen2.5-bpe"
LLAMA2 = SHARED / "models" / "tokenizers" / "llama2-sentencepiece-32k"

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there 😀 世界"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nExplain."},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "{\"sky\": \"clear\"}"},
    ],
]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & here",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _model_dir(tmp_path_factory, source: Path, file_name: str, config: dict) -> Path:
    if not (source / file_name).exists():
        pytest.skip(f"{source} not available")
    model_dir = tmp_path_factory.mktemp(source.name)
    (model_dir / file_name).symlink_to(source / file_name)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    config = json.loads((QWEN / "tokenizer_config.json").read_text()) if QWEN.exists() else {}
    config.setdefault("chat_template", QWEN25_TEMPLATE)
    return _model_dir(tmp_path_factory, QWEN, "tokenizer.json", config)


@pytest.fixture(scope="module")
def qwen_pair(qwen_dir):
    transformers = pytest.importorskip("transformers")
    return load_tokenizer(qwen_dir), transformers.AutoTokenizer.from_pretrained(str(qwen_dir))


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen_template_matches_hf(qwen_pair, index, add_generation_prompt):
    ours, hf = qwen_pair
    messages = CONVERSATIONS[index]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_qwen_template_with_tools_matches_hf(qwen_pair):
    ours, hf = qwen_pair
    messages = CONVERSATIONS[0]
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=TOOLS) == expected
    assert "Weather <now> & here" in expected  # tojson does not HTML-escape


def test_qwen_prompt_tokens_match_hf(qwen_pair):
    ours, hf = qwen_pair
    text = ours.apply_chat_template(CONVERSATIONS[1])
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids[0] == ours.token_to_id("<|im_start|>")


def test_llama2_template_uses_bos_and_raise_exception(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    model_dir = _model_dir(tmp_path_factory, LLAMA2, "tokenizer.model", {"chat_template": LLAMA2_TEMPLATE})
    ours, hf = load_tokenizer(model_dir), transformers.AutoTokenizer.from_pretrained(str(model_dir))
    messages = CONVERSATIONS[2]
    text = ours.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>[INST] What is 2+2? [/INST] 4 </s><s>[INST]")
    assert ours.encode(text, add_special_tokens=False)[0] == ours.bos_token_id
    with pytest.raises(InvalidRequestError, match="alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_no_template_is_a_clear_error():
    tok_dir = SHARED / "models" / "stories260K"
    if not (tok_dir / "tokenizer.model").exists():
        pytest.skip("stories260K not available")
    tok = load_tokenizer(tok_dir)
    assert tok.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages", [
    "hello",
    [{"content": "no role"}],
    [{"role": "user"}],
    ["not a dict"],
    None,
])
def test_malformed_messages(messages):
    with pytest.raises(InvalidRequestError, match="messages"):
        render_chat_template(QWEN25_TEMPLATE, messages)


def test_environment_features():
    template = (
        "{% for m in messages %}{% if loop.index0 > 0 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
        "|{{ strftime_now('%Y') | length }}|{{ bos_token }}|{% generation %}gen{% endgeneration %}"
    )
    out = render_chat_template(template, [{"role": "user", "content": "é"}, {"role": "x", "content": "y"}],
                               special_tokens={"bos_token": "<s>"})
    assert out == '{"role": "user", "content": "é"}|4|<s>|gen'


def test_sandbox_blocks_attribute_escape():
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(InvalidRequestError):
        render_chat_template(template, [{"role": "user", "content": "x"}])
