"""Writes the tokenizer a GGUF model file carries as a Hugging Face tokenizer.json.

Usage: python tokenizer_from_gguf.py MODEL.gguf OUT.json

The rig's chat model ships as a GGUF file only; chat-service counts tokens from a
tokenizer.json (context.tokenizers). A GGUF of a byte-level BPE model (tokenizer.ggml.model
"gpt2", as SmolLM2's) holds the vocabulary, the merges and the token types; this turns them into
the same BPE model with byte-level pre-tokenization (digits split one by one for the "smollm"
pre-tokenizer) and the control tokens as special added tokens. Other tokenizer kinds are refused
with a clear error rather than converted wrongly.
"""

import json
import sys

import gguf

CONTROL = 3  # gguf.TokenType.CONTROL
USER_DEFINED = 4


def field(reader, name):
    found = reader.fields.get(name)
    if found is None:
        sys.exit(f"{name} is missing from the GGUF file")
    return found


def strings(reader, name):
    f = field(reader, name)
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def scalar(reader, name):
    f = field(reader, name)
    return f.contents()


def main(model_path, out_path):
    reader = gguf.GGUFReader(model_path)
    kind = scalar(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        sys.exit(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is converted")
    pre = reader.fields.get("tokenizer.ggml.pre")
    pre = pre.contents() if pre is not None else "default"
    tokens = strings(reader, "tokenizer.ggml.tokens")
    merges = strings(reader, "tokenizer.ggml.merges")
    types_field = field(reader, "tokenizer.ggml.token_type")
    types = [int(types_field.parts[i][0]) for i in types_field.data]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    pre_tokenizers = [byte_level]
    if pre in ("smollm", "qwen2", "llama3"):
        pre_tokenizers.insert(0, {"type": "Digits", "individual_digits": True})
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": types[i] == CONTROL}
            for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(tokenizer, out, ensure_ascii=False)
    print(f"{out_path}: {len(tokens)} tokens, {len(merges)} merges, pre-tokenizer {pre}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
