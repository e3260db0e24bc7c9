import pytest
from transformers import AutoConfig, BertForSequenceClassification, GPT2ForSequenceClassification

from ftprof.errors import ModelError
from ftprof.known_configs import ALIASES, KNOWN_CHECKPOINTS, TINY_PRESETS, known_config_dict
from ftprof.train.models import build_model, load_tokenizer, max_positions, resolve_model_spec, train_tokenizer_for

TEXTS = ["a good film", "a bad film", "the plot was dull", "the cast was great"] * 20

# Parameter counts of the real checkpoints' encoders (from their model cards / from_pretrained), for
# which the offline configs must give the same shapes.
PARAMS = {
    "bert-base-uncased": 109_482_240,
    "distilbert-base-uncased": 66_362_880,
    "roberta-base": 124_645_632,
    "gpt2": 124_439_808,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_offline_architectures_match_real_parameter_counts(name):
    from transformers import AutoModel

    spec = resolve_model_spec(name, random_init=True)  # HF_HUB_OFFLINE=1: falls back to the offline table
    assert (spec.origin, spec.random_init) == ("offline-config", True)
    model = AutoModel.from_config(spec.config)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_every_known_name_resolves_offline():
    for name in list(KNOWN_CHECKPOINTS) + list(ALIASES) + list(TINY_PRESETS):
        assert resolve_model_spec(name, random_init=True).config.model_type == known_config_dict(name)["model_type"]


def test_hub_model_without_network_is_one_clear_error():
    with pytest.raises(ModelError, match="Hub is unreachable.*--random_init"):
        resolve_model_spec("bert-base-uncased")


def test_unknown_architecture_offline():
    with pytest.raises(ModelError, match="architecture is not known offline"):
        resolve_model_spec("someone/unknown-model", random_init=True)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model_spec(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_spec(str(tmp_path))


def test_directory_without_weights_needs_random_init(tmp_path, minilm_dir):
    AutoConfig.from_pretrained(minilm_dir).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no weights.*--random_init"):
        resolve_model_spec(str(tmp_path))
    assert resolve_model_spec(str(tmp_path), random_init=True).random_init


def test_local_pretrained_model_loads_weights_and_tokenizer(minilm_dir):
    spec = resolve_model_spec(str(minilm_dir))
    assert (spec.origin, spec.weights, spec.tokenizer_source) == ("local", str(minilm_dir), str(minilm_dir))
    tokenizer = load_tokenizer(spec, fallback=lambda: pytest.fail("the shipped tokenizer must be used"))
    model = build_model(spec, tokenizer, ["negative", "positive"])
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    # The encoder holds the pretrained weights, not a fresh init: compare one tensor with the file.
    from safetensors.torch import load_file

    saved = load_file(str(minilm_dir / "model.safetensors"))
    key = next(k for k in saved if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert (model.bert.encoder.layer[0].attention.self.query.weight == saved[key]).all()


def test_preset_gets_a_tokenizer_trained_on_the_data():
    spec = resolve_model_spec("tiny-gpt2")
    tokenizer = load_tokenizer(spec, fallback=lambda: train_tokenizer_for(spec, TEXTS))
    assert tokenizer.pad_token == "[PAD]"
    assert tokenizer("a good film")["input_ids"][0] == tokenizer.cls_token_id
    model = build_model(spec, tokenizer, ["0", "1"])
    assert isinstance(model, GPT2ForSequenceClassification)
    assert model.config.vocab_size == len(tokenizer) < 4096  # presets shrink to the trained vocabulary
    assert model.config.pad_token_id == tokenizer.pad_token_id  # GPT-2 needs it to find the last token


def test_max_positions():
    assert max_positions(resolve_model_spec("roberta-base", random_init=True).config) == 512
    assert max_positions(resolve_model_spec("gpt2", random_init=True).config) == 1024
    assert max_positions(resolve_model_spec("distilbert-base-uncased", random_init=True).config) == 512
