"""Seeds for the tokenizer_files fuzz target: small CLIP tokenizer folders (the 512 byte symbols,
the first 300 merges, the special tokens) as the target reads them: vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json, tokenizer.json separated by NUL bytes.

    python3 fuzz/seeds/make_tokenizer_seeds.py
"""
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent
repo = root.parent.parent
merges = [l.split(" ") for l in (repo / "src/models/clip_bpe_merges.txt").read_text().splitlines()[1:301]]
bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
symbols = [chr(c) for c in cs]
tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
vocab = {t: i for i, t in enumerate(tokens)}
merges_txt = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
fixtures = repo / "tests/fixtures/tokenizers"
for name in ["sd15-config", "sdxl-tokenizer2-config"]:
    config = (fixtures / name / "tokenizer_config.json").read_text()
    special = (fixtures / name / "special_tokens_map.json").read_text()
    files = [json.dumps(vocab), merges_txt, config, special, ""]
    (root / "tokenizer_files" / f"{name}-files").write_bytes("\0".join(files).encode())
    tokenizer_json = {"model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
                      "added_tokens": [{"id": len(tokens) - 1, "content": "<|endoftext|>", "special": True}]}
    files = ["", "", config, special, json.dumps(tokenizer_json)]
    (root / "tokenizer_files" / f"{name}-json").write_bytes("\0".join(files).encode())
