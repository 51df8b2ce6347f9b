"""SD-1.5's CLIP tokenizer, built on open_clip's byte-level BPE (its vocabulary file ships with the package).

Yields the same ids as HF ``CLIPTokenizer`` for ``openai/clip-vit-large-patch14`` called as SD pipelines call
it: ``tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids``.
Parity traps, each covered by ``tests/test_tokenizer.py``:

* padding uses ``<|endoftext|>`` (49407) like SD, not 0 like open_clip; SD uses *no* attention mask (the
  text encoder sees the pad tokens, and the U-Net cross-attends to all 77 positions), so none is returned;
* truncation keeps BOS + the first 75 tokens + EOS, i.e. the last id of a long prompt is still EOS;
* text cleanup (``clean="hf"``, the default) is that of transformers 5's ``CLIPTokenizer`` (4.x's
  ``CLIPTokenizerFast``; 4.x's slow class used ftfy, roughly ``clean="clip"``): NFC, every ``\\s+`` run -> one
  space, per-character lower-case (no final sigma) -- no ftfy, no HTML unescape, so ``"&amp;"`` stays three
  tokens. ``clean="clip"`` gives OpenAI CLIP's cleanup instead (ftfy + HTML unescape, as open_clip does), the
  one SD-1.5 was trained with; the two agree on ordinary prompts;
* ``<|startoftext|>`` / ``<|endoftext|>`` written verbatim in a prompt become the special ids.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import unicodedata

import regex as re
import torch


def _open_clip_tokenizer():
    """open_clip's tokenizer module, loaded from its file without open_clip's package ``__init__``, which
    imports every open_clip model, torchvision's ops and torch._dynamo (about 4 s of start-up in every
    process that tokenizes). The module imports nothing of its package; if a version ever does, the
    ordinary import is the fallback."""
    name = "_dginstyle_open_clip_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("open_clip")
    try:
        path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
        sys.modules[name] = module
        module.__spec__.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        import open_clip.tokenizer as module
    return module


_oc = _open_clip_tokenizer()
SimpleTokenizer, default_bpe, get_clean_fn = _oc.SimpleTokenizer, _oc.default_bpe, _oc.get_clean_fn

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's pre-tokenizer
_SPECIALS = r"<\|startoftext\|>|<\|endoftext\|>"
_SPLIT_SPECIALS = re.compile(f"({_SPECIALS})")  # captured, so split() keeps them (at odd indices)


def _clean_hf(text: str) -> str:
    # HF normalizer: NFC, collapse whitespace, then Rust char-wise to_lowercase (so no final-sigma rule).
    return "".join(c.lower() for c in re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)))


class Tokenizer:
    """``tok(texts) -> LongTensor (B, 77)``; ``encode`` / ``decode`` work on bare ids (no BOS/EOS/padding)."""

    def __init__(self, bpe_path: str | None = None, max_length: int = 77, clean: str = "hf"):
        if clean not in ("hf", "clip"):
            raise ValueError(f"clean must be 'hf' or 'clip', got {clean!r}")
        self._bpe = SimpleTokenizer(bpe_path or default_bpe())  # BPE merges + ids; its own specials are unused
        self.clean = clean
        self.max_length = max_length
        self.vocab_size = len(self._bpe.encoder)  # 49408
        self.bos_id, self.eos_id = self.vocab_size - 2, self.vocab_size - 1  # 49406, 49407
        self.pad_id = self.eos_id  # SD pads with EOS; open_clip would pad with 0
        self._special = {BOS: self.bos_id, EOS: self.eos_id}
        # OpenAI's regex finds the specials in the cleaned text, with IGNORECASE (it reads "'ſ" as "'s"); HF's regex
        # is case-sensitive and HF splits exact specials off the raw text first, cleaning only the pieces between.
        self._words = re.compile(f"{_SPECIALS}|{_WORDS}", re.IGNORECASE if clean == "clip" else 0)
        self._clean = get_clean_fn("lower") if clean == "clip" else _clean_hf

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: no BOS/EOS, no truncation."""
        parts = _SPLIT_SPECIALS.split(text) if self.clean == "hf" else [text]
        ids = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._special[part])
            else:
                ids.extend(j for word in self._words.findall(self._clean(part)) for j in self._word_ids(word))
        return ids

    def _word_ids(self, word: str) -> list[int]:
        if word in self._special:
            if self.clean == "clip":
                return [self._special[word]]
            # HF: only a case variant ("<|EndOfText|>") gets here; its pre-tokenizer keeps it one word, then the
            # byte-level step splits it into "<|", "endoftext", "|>", each BPE-encoded as plain text.
            return [j for w in re.findall(_WORDS, word) for j in self._word_ids(w)]
        word = "".join(self._bpe.byte_encoder[b] for b in word.encode("utf-8"))
        return [self._bpe.encoder[t] for t in self._bpe.bpe(word).split(" ")]

    def is_truncated(self, text: str) -> bool:
        """Whether ``text`` loses tokens to the 77-token context (so callers can warn)."""
        return len(self.encode(text)) > self.max_length - 2

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        """(B, max_length) ids: BOS, at most max_length - 2 tokens, EOS, then EOS padding (a str gives B = 1)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in zip(out, texts):
            ids = [self.bos_id, *self.encode(text)[: self.max_length - 2], self.eos_id]  # EOS survives truncation
            row[: len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of ``ids`` as HF ``decode(ids, clean_up_tokenization_spaces=False)``: words joined by spaces."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        names = {v: k for k, v in self._special.items()}
        text = "".join(names[i] if i in names else self._bpe.decoder[i]
                       for i in ids if not (skip_special and i in names))
        text = bytearray(self._bpe.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def vocab(self) -> dict[str, int]:
        """HF ``vocab.json`` content: token -> id, with HF's special-token spellings."""
        return {**{self._bpe.decoder[i]: i for i in range(self.bos_id)}, BOS: self.bos_id, EOS: self.eos_id}

    def save_hf_files(self, folder: str) -> None:
        """Write a diffusers ``tokenizer/`` folder that ``CLIPTokenizer.from_pretrained`` loads offline:
        vocab.json, merges.txt, and configs setting EOS padding and model_max_length (SD pipelines pad to it)."""
        os.makedirs(folder, exist_ok=True)
        merges = sorted(self._bpe.bpe_ranks, key=self._bpe.bpe_ranks.get)
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "do_lower_case": True,
                  "errors": "replace", "add_prefix_space": False, **specials}
        files = {"vocab.json": json.dumps(self.vocab(), ensure_ascii=False),
                 "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                 "special_tokens_map.json": json.dumps(specials, indent=2),
                 "tokenizer_config.json": json.dumps(config, indent=2)}
        for name, content in files.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(content)
