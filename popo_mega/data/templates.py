"""Prompt templates: question text -> prompt text -> prompt token ids.

    qwen-math  the Qwen2.5-Math chain-of-thought template (the one the POPO / Dr. GRPO / SimpleRL
               recipes train and evaluate Qwen2.5-Math with): ChatML with the system prompt
               "Please reason step by step, and put your final answer within \\boxed{}."
               The ChatML markers are written out, so it needs no chat template in the tokenizer.
    plain      the question as it is (the synthetic task; base models without a chat format)
    chat       the tokenizer's own chat template (``apply_chat_template``) with one user turn: the
               question followed by the boxed-answer instruction; a system prompt when given

Prompts are encoded without added special tokens (``add_special_tokens=False``): the templates
carry every marker they need, and Qwen tokenizers add none anyway.
"""

from __future__ import annotations

from typing import Sequence

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

QWEN_MATH = (
    "<|im_start|>system\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
    "<|im_start|>user\n{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

TEMPLATES = ("qwen-math", "plain", "chat")


def render_prompt(question: str, template: str, tokenizer=None, system_prompt: str | None = None) -> str:
    """The prompt text for ``question`` under ``template`` (one of TEMPLATES).

    ``tokenizer`` is needed by "chat" only (its ``chat_template``); ``system_prompt`` is used by "chat".
    """
    if template == "qwen-math":
        return QWEN_MATH.replace("{question}", question)
    if template == "plain":
        return question
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template 'chat' needs the tokenizer (its chat template)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"template 'chat': tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no "
                             "chat_template; use --template qwen-math or plain")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": question + "\n" + BOXED_INSTRUCTION})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def encode_prompts(questions: Sequence[str], template: str, tokenizer, system_prompt: str | None = None) -> list[list[int]]:
    """Token ids [len(questions)][prompt length] of the rendered prompts (no special tokens added)."""
    return [list(tokenizer.encode(render_prompt(q, template, tokenizer, system_prompt), add_special_tokens=False))
            for q in questions]
