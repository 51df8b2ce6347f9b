import numpy as np
import pytest
import torch
from PIL import Image

from mrlf import prompts as P
from segmentation.labels import LabelError


def _label():
    lab = np.full((4, 5), 255, np.uint8)
    lab[0, :2] = 15   # bus
    lab[1] = 6        # traffic light
    lab[2, 0] = 0     # road
    lab[3, 4] = 19    # the original's mutated void
    lab[3, 0] = 7     # traffic sign
    return lab


def test_class_stack_order_and_void():
    lab = _label()
    expect = "road traffic light traffic sign bus"
    assert P.class_stack(lab) == expect
    assert P.class_stack(lab.astype(np.int64)) == expect
    assert P.class_stack(torch.from_numpy(lab)) == expect
    assert P.class_stack(Image.fromarray(lab)) == expect
    assert P.present_classes(lab) == [0, 6, 7, 15]
    assert P.class_stack(np.full((2, 2), 255, np.uint8)) == ""


def test_class_stack_from_palette_png(tmp_path):
    lab = _label()
    im = Image.fromarray(lab).convert("P")  # convert keeps the values as indices
    im.putpalette([i % 256 for i in range(768)][::-1])
    im.save(tmp_path / "x.png")
    assert P.class_stack(tmp_path / "x.png") == "road traffic light traffic sign bus"
    assert P.class_stack(str(tmp_path / "x.png")) == "road traffic light traffic sign bus"


def test_class_stack_rejects_bad_values():
    with pytest.raises(LabelError, match="20"):
        P.class_stack(np.array([[1, 20]], np.uint8))


def test_weather_prompt_follows_documented_draws():
    cfg = P.PromptConfig()
    rng, ref = np.random.default_rng(0), np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        text, w = P.weather_prompt("road car", rng, cfg)
        if ref.random() < 0.5:
            ew = str(ref.choice(["snowy", "rainy", "sunny", "foggy", "night"]))
            assert (text, w) == (f"A city street scene with road car, in {ew} weather.", ew)
        else:
            assert (text, w) == ("road car", None)
        seen.add(w)
    assert None in seen and len(seen) > 2
    assert rng.random() == ref.random()  # same stream position afterwards


def test_weather_prompt_probability_extremes_and_config():
    rng = np.random.default_rng(1)
    assert P.weather_prompt("sky", rng, P.PromptConfig(weather_prob=0.0)) == ("sky", None)
    cfg = P.PromptConfig(weather_prob=1.0, weather_words=["dusk"], template="{classes} at {weather}")
    assert P.weather_prompt("sky", rng, cfg) == ("sky at dusk", "dusk")
    # p = 0 still consumes one rng.random(), so the stream stays aligned
    a, b = np.random.default_rng(2), np.random.default_rng(2)
    P.weather_prompt("x", a, P.PromptConfig(weather_prob=0.0))
    b.random()
    assert a.random() == b.random()
    with pytest.raises(ValueError):
        P.PromptConfig(weather_prob=1.5)
    with pytest.raises(ValueError):
        P.PromptConfig(weather_words=())
    with pytest.raises(TypeError):
        P.weather_prompt("x", np.random.RandomState(0))


def test_exact_original_template():
    cfg = P.PromptConfig(weather_prob=1.0, weather_words=("night",))
    text, w = P.weather_prompt("road sidewalk", np.random.default_rng(0), cfg)
    assert text == "A city street scene with road sidewalk, in night weather." and w == "night"


def test_make_prompt_seeded_and_negative():
    cfg = P.PromptConfig(negative_prompt="blurry")
    p1 = P.make_prompt(_label(), np.random.default_rng(3), cfg)
    p2 = P.make_prompt(_label(), np.random.default_rng(3), cfg)
    assert p1 == p2
    assert p1.classes == "road traffic light traffic sign bus" and p1.negative == "blurry"
    assert p1.text == (p1.classes if p1.weather is None
                       else f"A city street scene with {p1.classes}, in {p1.weather} weather.")
    outs = {P.make_prompt(_label(), np.random.default_rng(s)).weather for s in range(30)}
    assert None in outs and outs - {None} <= set(P.DEFAULT_WEATHER)
