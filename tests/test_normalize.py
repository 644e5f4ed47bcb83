from mla_registry.normalize import name, normalize


def test_known_pairs():
    assert normalize("Hello, World!") == "hello world"
    assert normalize("I'm twenty-five years old.") == "i am 25 years old"
    assert normalize("The colour of the centre") == "the color of the center"
    assert normalize("Mr. Smith won't go") == "mister smith will not go"
    assert normalize("Uh, it's done [noise]") == "it is done"  # fillers and bracketed events go


def test_name_pins_the_spelling_map():
    assert "EnglishTextNormalizer" in name() and "sha256:" in name()
