"""Regenerate ``popo_mega/assets/synthetic_tokenizer/``: a character-level HF tokenizer shipped in the
repo so the CPU quickstart and the tests download nothing.

    python -m popo_mega.assets.build_synthetic_tokenizer [OUT_DIR]

Vocabulary (100 ids, fixed order so regenerating gives the same ids):
    0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then "\\n" and the 95 printable ASCII characters (space .. ~).
One character is one token (a ``WordLevel`` model over single characters, split with a regex that
isolates every character); decoding concatenates without spaces. Any other character maps to <unk>.
Nothing is added around encoded text (no BOS/EOS post-processor): the caller decides, as with Qwen.
A tiny chat template ("user: ...\\nassistant: ") lets the chat prompt path be tested offline.
"""

from __future__ import annotations

import json
import os
import sys

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_tokenizer")


def build(out_dir: str = DEFAULT_DIR) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    # name the class every transformers release knows (5.x writes its new "TokenizersBackend")
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR))
