import pytest

from shared.enhancer import (
    BUILTIN_ENGINE,
    DEFAULT_TEMPLATE,
    MAX_PROMPT_CHARS,
    TEMPLATES,
    Enhancement,
    enhance,
    enhance_builtin,
)

# A term each template must bring, so a template that silently did nothing would fail.
SIGNATURE_TERMS = {
    "general": "highly detailed",
    "photorealistic": "85mm lens",
    "illustration": "illustration",
    "minimalist": "negative space",
    "sticker": "outlines",
    "product": "studio",
    "comic": "comic",
}


def test_the_seven_templates_of_the_contract():
    assert TEMPLATES == (
        "general",
        "photorealistic",
        "illustration",
        "minimalist",
        "sticker",
        "product",
        "comic",
    )
    assert DEFAULT_TEMPLATE == "general"
    assert BUILTIN_ENGINE == "builtin"


@pytest.mark.parametrize("template", TEMPLATES)
def test_each_template_keeps_the_words_and_adds_its_style(template):
    out = enhance_builtin("a cat sitting on a windowsill", template)
    assert "cat sitting on a windowsill" in out
    assert SIGNATURE_TERMS[template] in out.lower()
    assert len(out) > len("a cat sitting on a windowsill") + 40


def test_templates_differ_from_each_other():
    outputs = {enhance_builtin("a cat", t) for t in TEMPLATES}
    assert len(outputs) == len(TEMPLATES)


def test_photorealistic_reads_like_the_contract_example():
    out = enhance_builtin("a cat", "photorealistic")
    assert out.startswith("A photorealistic")
    assert "a cat" in out and "f/1.8" in out and "window lighting" in out


@pytest.mark.parametrize("template", TEMPLATES)
def test_deterministic(template):
    assert enhance_builtin("a lighthouse at dusk", template) == enhance_builtin(
        "a lighthouse at dusk", template
    )


@pytest.mark.parametrize("template", TEMPLATES)
def test_enhancing_twice_changes_nothing(template):
    once = enhance_builtin("a lighthouse at dusk", template)
    assert enhance_builtin(once, template) == once
    assert enhance_builtin(once + "  ", template) == once


def test_whitespace_is_normalized_and_trailing_punctuation_dropped():
    out = enhance_builtin("  a   red\n\tcar.  ", "general")
    assert out.startswith("a red car, highly detailed")
    assert "  " not in out and "\n" not in out


def test_lead_is_not_repeated_when_the_prompt_names_the_medium():
    out = enhance_builtin("a sticker of a fox", "sticker")
    assert out.startswith("a sticker of a fox, ")
    assert "die-cut sticker" not in out
    out = enhance_builtin("A fox", "sticker")
    assert out.startswith("A die-cut sticker of a fox, ")


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown enhancement template"):
        enhance_builtin("a cat", "baroque")


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("length", [3900, 3999, 4000, 4500])
def test_output_is_capped(template, length):
    prompt = ("lorem ipsum " * 500)[:length]
    out = enhance_builtin(prompt, template)
    assert len(out) <= MAX_PROMPT_CHARS
    if length <= 3990:
        assert prompt.strip() in out  # the user's words win over the decoration


def test_near_the_cap_some_terms_still_fit():
    prompt = "x " * ((MAX_PROMPT_CHARS - len(", highly detailed, balanced composition") - 2) // 2)
    out = enhance_builtin(prompt, "general")
    assert out.startswith(prompt.strip() + ", highly detailed, balanced composition")
    assert "high quality" not in out
    assert len(out) <= MAX_PROMPT_CHARS


def test_empty_prompt_stays_empty():
    assert enhance_builtin("   ", "general") == ""


async def test_enhance_uses_the_builtin_engine():
    result = await enhance("a cat", "comic")
    assert result == Enhancement(prompt=enhance_builtin("a cat", "comic"), engine="builtin")
    with pytest.raises(ValueError):
        await enhance("a cat", "nope")
