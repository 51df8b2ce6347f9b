"""ldm.tokenizer against HF's CLIP tokenizer (SD-1.5's), built offline from open_clip's BPE file."""
from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe

from ldm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

BOS, EOS = 49406, 49407
CITYSCAPES = ("road sidewalk building wall fence pole traffic light traffic sign vegetation terrain sky person rider "
              "car truck bus train motorcycle bicycle")
PROMPTS = [
    "road sidewalk building fence pole traffic light vegetation terrain sky person car truck bus",
    "A city street scene with road sky, in night weather.",
    "A city street scene with road, sidewalk, car, in foggy weather.",
    "",
    "   ",
    ", ".join([CITYSCAPES] * 4),  # 87 tokens: truncated
    "a photo of a café in Zürich, façade, naïve crème brûlée",
    "東京の交差点 夜 雨, 서울 거리, 北京街道",
    "a dog 🐶 on a bike 🚲 ❤️ 👍🏽",
    "cafÃ© mojibake â€™ Ã¼ber",
    "salt &amp; pepper &lt;b&gt; &amp;amp; &#39;quoted&#39; &nbsp;x",
    "!!!??? ... ,,, ;; -- (((a))) [b] {c} <d> | / \\ @#$%^&*~`",
    "1234567890 3.14 2024-01-31 10:30pm 1st 22nd 1,000,000",
    "multiple   spaces\nand\nnewlines\t\ttabs \r\n end  ",
    "UPPER CASE PROMPT With MiXeD Case",
    "don't it's we're they've I'm you'll he'd DON'T IT'S",
    "ﬁne ligature, ＦＵＬＬＷＩＤＴＨ １２３, ΟΔΟΣ Σ, İstanbul, straße",
    "curly ‘quotes’ and “double” — em dash … ellipsis",
    "a<|endoftext|>b <|startoftext|> c <|EndOfText|>",
    "zero\u200bwidth non\xa0breaking ideographic\u3000space \x1cfile sep",
]


def _write_reference_files(folder) -> int:
    """HF vocab.json + merges.txt derived straight from open_clip's BPE file; returns the vocabulary size."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is a header
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_ref")
    assert _write_reference_files(folder) == 49408
    return folder


@pytest.fixture(scope="module")
def hf(ref_folder):
    # CLIPTokenizerFast: the tokenizers-backed CLIP tokenizer (transformers 4.x) == CLIPTokenizer (transformers 5.x).
    return transformers.CLIPTokenizerFast.from_pretrained(str(ref_folder), pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def hf_ids(hf, texts):
    # Exactly how SD pipelines call it.
    return hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_hf(tok, hf, prompt):
    assert tok(prompt).tolist() == hf_ids(hf, [prompt]).tolist()


def test_batch_matches_hf(tok, hf):
    ids = tok(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == torch.long
    assert torch.equal(ids, hf_ids(hf, PROMPTS))
    assert tok(PROMPTS[0]).shape == (1, 77)


def test_random_strings_match_hf(tok, hf):
    pieces = list("abcXYZ 'stdlmrev\t\n\xa0\u3000\u200b!?.,;:&<>|#\"-_()0123456789éÉßΣİıſﬁＡ１日本語한😀❤️\u0301Ãã©")
    pieces += ["&amp;", "<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "don't", "IT'S", "'ſ"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(1000)]
    assert torch.equal(tok(texts), hf_ids(hf, texts))


def test_empty_prompt_pads_with_eos(tok):
    assert tok("").tolist() == [[BOS] + [EOS] * 76]  # open_clip would give [BOS, EOS, 0, 0, ...]
    assert tok.encode("") == [] and tok.encode(" \n\t") == []


def test_truncation_keeps_eos(tok):
    long = tok.encode(PROMPTS[5])
    assert len(long) > 75 and tok.is_truncated(PROMPTS[5])
    assert tok(PROMPTS[5])[0].tolist() == [BOS] + long[:75] + [EOS]
    assert tok.encode("a " * 75) == [320] * 75  # "a</w>": one token per word
    assert not tok.is_truncated("a " * 75) and tok.is_truncated("a " * 76)
    assert tok("a " * 76)[0].tolist() == [BOS] + [320] * 75 + [EOS]


def test_short_context(hf):
    tok = Tokenizer(max_length=8)
    assert tok(CITYSCAPES)[0].tolist() == hf(CITYSCAPES, max_length=8, truncation=True).input_ids
    assert tok("car").tolist() == [[BOS, 1615, EOS, EOS, EOS, EOS, EOS, EOS]]


def test_special_ids_and_vocab(tok, ref_folder):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length, tok.vocab_size) == (BOS, EOS, EOS, 77, 49408)
    assert tok.vocab() == json.loads((ref_folder / "vocab.json").read_text(encoding="utf-8"))


def test_decode_matches_hf(tok, hf):
    for prompt in PROMPTS:
        ids = hf(prompt).input_ids
        for skip in (True, False):
            assert tok.decode(ids, skip_special=skip) == hf.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    rng = random.Random(0)  # arbitrary ids, including broken UTF-8 byte sequences
    for _ in range(200):
        ids = [rng.randrange(49408) for _ in range(rng.randint(0, 20))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert tok.decode(tok(PROMPTS[1])[0]) == "a city street scene with road sky , in night weather ."


@pytest.mark.parametrize("cls", ["CLIPTokenizerFast", "CLIPTokenizer"])
def test_exported_files_load_in_hf(tok, ref_folder, tmp_path, cls):
    tok.save_hf_files(str(tmp_path))
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8") == (ref_folder / "merges.txt").read_text(encoding="utf-8")
    loaded = getattr(transformers, cls).from_pretrained(str(tmp_path))
    assert (loaded.model_max_length, loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (77, BOS, EOS, EOS)
    assert len(loaded) == 49408
    # No max_length: diffusers pads to tokenizer.model_max_length, so the config must carry 77.
    # (transformers 4's slow CLIPTokenizer cleans with ftfy, so only plain prompts are compared for it.)
    prompts = PROMPTS if cls == "CLIPTokenizerFast" else PROMPTS[:6]
    ids = loaded(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, tok(prompts))


def test_clip_cleanup_matches_open_clip():
    clip, oc = Tokenizer(clean="clip"), SimpleTokenizer()
    for prompt in PROMPTS:
        if "<|" not in prompt:  # open_clip spells its specials <start_of_text> / <end_of_text>
            assert clip.encode(prompt) == oc.encode(prompt), prompt
    # The cleanups differ only on text that ftfy / HTML unescape would repair:
    hf = Tokenizer()
    assert clip.encode("cafÃ© &amp;") == hf.encode("café &") != hf.encode("cafÃ© &amp;")
    for prompt in PROMPTS[:3] + PROMPTS[5:6]:
        assert torch.equal(clip(prompt), hf(prompt))
    assert clip.encode("x<|endoftext|>") == [343, EOS]


def test_bad_clean_mode():
    with pytest.raises(ValueError):
        Tokenizer(clean="lower")


def test_importing_the_tokenizer_leaves_open_clip_s_models_unimported():
    """ldm.tokenizer loads open_clip's tokenizer module alone: the package's __init__ (every model, torchvision
    ops, torch._dynamo) costs seconds of start-up in every process that tokenizes."""
    import subprocess
    import sys

    code = ("import sys; from ldm.tokenizer import Tokenizer; ids = Tokenizer()(['a snowy street']); "
            "print(sorted(m for m in sys.modules if m == 'open_clip' or m.startswith('open_clip.')), ids[0, :3].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert out.startswith("[] [49406, ")
