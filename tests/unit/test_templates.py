"""popo_mega.data.templates: the Qwen2.5-Math boxed template, plain, and chat via the tokenizer. CPU; <2 s."""

import pytest

from popo_mega.data.templates import BOXED_INSTRUCTION, encode_prompts, render_prompt
from popo_mega.rewards.synthetic import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_qwen_math_template_is_the_qwen25_math_cot_prompt():
    # written out by hand from Qwen2.5-Math's evaluation template "qwen25-math-cot"
    expected = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                "<|im_start|>user\nWhat is $1+{2}$?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt("What is $1+{2}$?", "qwen-math") == expected


def test_plain_is_the_question():
    assert render_prompt("12+3=", "plain") == "12+3="


def test_chat_uses_the_tokenizers_template(tok):
    # the shipped tokenizer's template: "role: content\n" per message, then "assistant: "
    assert render_prompt("2+2?", "chat", tok) == "user: 2+2?\n" + BOXED_INSTRUCTION + "\nassistant: "
    assert render_prompt("2+2?", "chat", tok, system_prompt="Be brief.").startswith("system: Be brief.\nuser: 2+2?")


def test_chat_errors(tok):
    with pytest.raises(ValueError, match="needs the tokenizer"):
        render_prompt("q", "chat")

    class NoTemplate:
        chat_template = None
        name_or_path = "bare"

    with pytest.raises(ValueError, match="'bare' has no chat_template"):
        render_prompt("q", "chat", NoTemplate())
    with pytest.raises(ValueError, match="unknown prompt template 'qwen'"):
        render_prompt("q", "qwen")


def test_encode_prompts_adds_no_special_tokens(tok):
    ids = encode_prompts(["12+3=", "7-9="], "plain", tok)
    # one token per character; ids are in the order of build_synthetic_tokenizer: 4 specials, "\n", then chr(32)..
    assert ids == [[4 + 1 + ord(c) - 32 for c in "12+3="], [4 + 1 + ord(c) - 32 for c in "7-9="]]
    assert tok.decode(ids[0]) == "12+3="
