"""--task causal-lm: packing and padding, offline decoder architectures, the model/tokenizer fit, the flags."""

import json
import math

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftprof.errors import ConfigError, DataError, ModelError
from ftprof.known_configs import KNOWN_CHECKPOINTS, TINY_PRESETS
from ftprof.train.bpe_tokenizer import train_byte_bpe
from ftprof.train.causal_lm_data import (
    IGNORE_INDEX,
    CausalLMCollator,
    lm_datasets,
    pack,
    prepare_corpus,
    tokenize_documents,
)
from ftprof.train.data import load_raw
from ftprof.train.models import build_causal_lm, load_tokenizer, resolve_model_spec, train_tokenizer_for
from ftprof.train.run import parse
from ftprof.train.synthetic import synthetic_dataset
from ftprof.train.tasks import max_length_for
from ftprof.train.wordpiece_tokenizer import train_wordpiece

TEXTS = ["a good film", "a dull film with a weak plot", "the cast was great", "it is tedious"] * 25
EOS = 0  # the byte-level tokenizer's first special token


@pytest.fixture(scope="module")
def bpe():
    return train_byte_bpe(TEXTS, 400, 512)


def token_docs(lengths: list[int]) -> Dataset:
    """Documents whose ids say where they came from (doc d, position i → 1000 d + i + 1), each ending in EOS."""
    return Dataset.from_dict(
        {"input_ids": [[1000 * d + i + 1 for i in range(n)] + [EOS] for d, n in enumerate(lengths)]}
    )


# --- packing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 7, 16, 50])
def test_packing_cuts_the_concatenated_stream_into_exact_blocks(block):
    docs = token_docs([3, 0, 11, 5, 29, 2, 8, 1, 13])
    stream = [t for ids in docs[:]["input_ids"] for t in ids]
    blocks = pack(docs, block)[:]["input_ids"]
    assert all(len(b) == block for b in blocks)  # every block exactly --max_length
    assert [t for b in blocks for t in b] == stream[: len(blocks) * block]  # in order, nothing lost or repeated...
    assert len(stream) - len(blocks) * block < block  # ...but the tail that can't fill a block
    assert len(blocks) == len(stream) // block


def test_packing_honours_a_shuffled_selection():
    docs = token_docs([4, 6, 2, 9]).shuffle(seed=3).select([2, 0])
    expected = [t for ids in docs[:]["input_ids"] for t in ids]
    assert [t for b in pack(docs, 3)[:]["input_ids"] for t in b] == expected[: len(expected) // 3 * 3]


def test_documents_end_with_eos_and_empty_ones_are_skipped(bpe):
    texts = ["a good film", "", None, "   ", "it is tedious"]
    docs = tokenize_documents(Dataset.from_dict({"text": texts}), "text", bpe)[:]["input_ids"]
    assert len(docs) == 2
    assert all(ids[-1] == bpe.eos_token_id and bpe.eos_token_id not in ids[:-1] for ids in docs)
    assert [bpe.decode(ids[:-1]) for ids in docs] == ["a good film", "it is tedious"]
    packed = pack(tokenize_documents(Dataset.from_dict({"text": texts}), "text", bpe), 2)
    stream = [t for b in packed[:]["input_ids"] for t in b]
    assert stream.count(bpe.eos_token_id) in (1, 2)  # one EOS between the documents (the last may be cut off)


def test_a_tokenizer_that_ends_documents_itself_gets_no_second_end():
    wordpiece = train_wordpiece(TEXTS, 200, 512)  # [CLS] text [SEP]: SEP ends a document when there is no EOS
    docs = tokenize_documents(Dataset.from_dict({"text": ["a good film"]}), "text", wordpiece)[:]["input_ids"]
    assert docs[0][0] == wordpiece.cls_token_id
    assert docs[0][-1] == wordpiece.sep_token_id
    assert docs[0].count(wordpiece.sep_token_id) == 1


def test_packing_and_padding_datasets(bpe):
    corpus = prepare_corpus(synthetic_dataset(n_train=60, n_eval=30), None)
    packed_train, packed_eval = lm_datasets(corpus, bpe, 16, packing=True)
    assert {len(ids) for ids in packed_train[:]["input_ids"]} == {16}
    n_tokens = sum(len(ids) for ids in tokenize_documents(corpus.train, "text", bpe)[:]["input_ids"])
    assert len(packed_train) == n_tokens // 16
    padded_train, padded_eval = lm_datasets(corpus, bpe, 64, packing=False, with_length=True)
    assert (len(padded_train), len(padded_eval)) == (60, 30)  # one row per document
    lengths = [len(ids) for ids in padded_train[:]["input_ids"]]
    assert max(lengths) == 64
    assert min(lengths) < 64
    assert padded_train[:]["length"] == lengths


def test_a_split_too_small_for_one_block_is_one_clear_error(bpe):
    corpus = prepare_corpus(
        DatasetDict(train=Dataset.from_dict({"text": TEXTS}), validation=Dataset.from_dict({"text": ["a film"]})), None
    )
    with pytest.raises(
        DataError, match=r"eval split has \d+ tokens, less than one block of --max_length 64.*--packing false"
    ):
        lm_datasets(corpus, bpe, 64)


# --- batches -------------------------------------------------------------------------------------------------


def test_padding_masks_pads_in_labels_and_attention():
    batch = CausalLMCollator(pad_token_id=9)([{"input_ids": [5, 6, 7, 8]}, {"input_ids": [3, 4]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [3, 4, 9, 9]]
    assert batch["labels"].tolist() == [[5, 6, 7, 8], [3, 4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_pads_are_found_by_position_so_eos_as_pad_still_trains():
    eos = 2  # GPT-2 style: the pad token is the EOS token
    batch = CausalLMCollator(pad_token_id=eos)([{"input_ids": [5, 6, eos]}, {"input_ids": [7, eos]}])
    assert batch["labels"].tolist() == [[5, 6, eos], [7, eos, IGNORE_INDEX]]  # the real EOS is a target


def test_packed_blocks_need_no_mask_and_padding_rounds_up():
    packed = CausalLMCollator(pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}])
    assert set(packed) == {"input_ids", "labels"}
    assert torch.equal(packed["input_ids"], packed["labels"])
    rounded = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3]}])
    assert rounded["input_ids"].shape == (1, 8)
    assert rounded["attention_mask"].sum() == 3


# --- data files ----------------------------------------------------------------------------------------------


def test_txt_files_hold_one_document_per_line(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"document number {i}\n" for i in range(20)) + "\n")
    (tmp_path / "valid.txt").write_text("held out one\nheld out two\n")
    corpus = prepare_corpus(load_raw(str(tmp_path)), None)
    assert corpus.text_column == "text"
    assert len(corpus.eval) == 2
    assert corpus.train["text"][:2] == ["document number 0", "document number 1"]


def test_corpus_needs_no_labels_and_ignores_them(tmp_path, sst2_dir):
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"content": f"text {i}", "id": i}) + "\n" for i in range(10))
    )
    corpus = prepare_corpus(load_raw(str(tmp_path / "train.jsonl")), None, seed=1)
    assert (corpus.text_column, len(corpus.train), len(corpus.eval)) == ("content", 9, 1)
    sst2 = prepare_corpus(load_raw(str(sst2_dir)), None, max_train_samples=50)
    assert (sst2.text_column, len(sst2.train), len(sst2.eval)) == ("sentence", 50, 872)  # label column ignored


# --- architectures -------------------------------------------------------------------------------------------

# Published sizes (model cards / papers), and the exact counts of transformers' modules on these configs.
PUBLISHED = {
    "Qwen/Qwen2.5-0.5B": (0.494e9, 494_032_768),  # card: 0.49B (0.36B without embeddings), tied
    "meta-llama/Llama-3.2-1B": (1.24e9, 1_235_814_400),  # card: 1.23B; tied embeddings
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": (1.1e9, 1_100_048_384),
    "TinyLlama/TinyLlama_v1.1": (1.1e9, 1_100_048_384),
    "mistralai/Mistral-7B-v0.1": (7.24e9, 7_241_732_096),
    "gpt2": (124e6, 124_439_808),  # the Hub's figures (GPT-2's paper undercounted: 117M, 345M, 762M, 1542M)
    "gpt2-medium": (355e6, 354_823_168),
    "gpt2-large": (774e6, 774_030_080),
    "gpt2-xl": (1.56e9, 1_557_611_200),  # "1.5B" on its card
    "distilgpt2": (82e6, 81_912_576),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_offline_decoders_build_on_meta_with_their_published_size(name):
    spec = resolve_model_spec(name, random_init=True)  # HF_HUB_OFFLINE=1: the offline table
    assert spec.origin == "offline-config"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(spec.config)
    params = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    published, exact = PUBLISHED[name]
    assert abs(params - published) / published < 0.02
    assert params == exact


def test_offline_llama_style_configs_keep_their_shape():
    qwen = resolve_model_spec("Qwen/Qwen2.5-0.5B", random_init=True).config
    assert (qwen.num_key_value_heads, qwen.tie_word_embeddings, qwen.rope_parameters["rope_theta"]) == (2, True, 1e6)
    llama = resolve_model_spec("meta-llama/Llama-3.2-1B", random_init=True).config
    assert llama.rope_parameters["rope_type"] == "llama3"
    assert llama.max_position_embeddings == 131072
    mistral = resolve_model_spec("mistralai/Mistral-7B-v0.1", random_init=True).config
    assert (mistral.sliding_window, mistral.tie_word_embeddings) == (4096, False)


@pytest.mark.parametrize(("name", "tied"), [("tiny-llama", False), ("tiny-qwen2", True)])
def test_tiny_decoders_are_real_architectures_with_gqa(name, tied):
    model = AutoModelForCausalLM.from_config(resolve_model_spec(name).config)
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (64, 32)  # 4 query heads, 2 KV heads
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    assert TINY_PRESETS[name]["vocab_size"] == 4096


def test_every_decoder_config_is_known_by_its_hub_name():
    assert {"Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "mistralai/Mistral-7B-v0.1"} <= set(KNOWN_CHECKPOINTS)


def test_default_block_size_is_the_model_limit_at_most_1024(tmp_path):
    def block(model, task):
        script, _ = parse(["--model", model, "--task", task, "--output_dir", str(tmp_path)])
        return max_length_for(script, resolve_model_spec(model, random_init=True))

    assert block("tiny-llama", "causal-lm") == 512
    assert block("gpt2", "causal-lm") == 1024
    assert block("Qwen/Qwen2.5-0.5B", "causal-lm") == 1024
    assert block("gpt2", "classification") == 512


# --- model and tokenizer -------------------------------------------------------------------------------------


def test_preset_vocabulary_matches_the_trained_tokenizer_and_ties_hold():
    spec = resolve_model_spec("tiny-qwen2")
    tokenizer = load_tokenizer(spec, lambda: train_tokenizer_for(spec, TEXTS, causal_lm=True))
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, None)
    model = build_causal_lm(spec, tokenizer)
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0] < 4096
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    ids = torch.tensor([tokenizer("a good film")["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - math.log(len(tokenizer))) < 0.5  # random weights: about ln(vocab)


def test_pretrained_model_grows_its_embedding_for_a_larger_tokenizer_and_stays_tied(tmp_path):
    spec = resolve_model_spec("tiny-qwen2")
    tokenizer = train_byte_bpe(TEXTS, 400, 512)
    build_causal_lm(spec, tokenizer).save_pretrained(tmp_path)
    tokenizer.add_tokens(["<|new_a|>", "<|new_b|>"])
    tokenizer.save_pretrained(tmp_path)
    local = resolve_model_spec(str(tmp_path))
    assert not local.random_init
    model = build_causal_lm(local, AutoTokenizer.from_pretrained(tmp_path))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.dtype == torch.float32


def test_eos_as_pad_does_not_freeze_the_eos_embedding():
    spec = resolve_model_spec("tiny-llama")
    tokenizer = train_byte_bpe(TEXTS, 400, 512)
    tokenizer.pad_token = tokenizer.eos_token  # as load_tokenizer does for GPT-2-style tokenizers
    model = build_causal_lm(spec, tokenizer)
    assert model.config.pad_token_id != tokenizer.eos_token_id  # padding_idx rows never train
    assert model.model.embed_tokens.padding_idx != tokenizer.eos_token_id


def test_architectures_without_a_causal_head_fail_before_data():
    with pytest.raises(ModelError, match="'tiny-distilbert' \\(distilbert\\) has no causal language-model head"):
        build_causal_lm(resolve_model_spec("tiny-distilbert"), train_byte_bpe(TEXTS, 300, 64))


def test_an_encoder_trained_as_a_causal_lm_gets_a_causal_mask():
    model = build_causal_lm(resolve_model_spec("tiny-bert"), train_byte_bpe(TEXTS, 300, 64))
    assert model.config.is_decoder is True


# --- flags ---------------------------------------------------------------------------------------------------


def parse_lm(tmp_path, *extra):
    return parse(["--task", "causal-lm", "--model", "tiny-llama", "--output_dir", str(tmp_path / "out"), *extra])


def test_causal_lm_keeps_the_best_model_by_eval_loss(tmp_path):
    script, args = parse_lm(tmp_path)
    assert (script.task, script.packing) == ("causal-lm", True)
    assert (args.metric_for_best_model, args.greater_is_better, args.load_best_model_at_end) == (
        "eval_loss",
        False,
        True,
    )
    _, classify = parse(["--model", "tiny-bert", "--output_dir", str(tmp_path / "c")])
    assert (classify.metric_for_best_model, classify.greater_is_better) == ("accuracy", True)  # unchanged


def test_perplexity_as_best_metric_is_lower_is_better(tmp_path):
    _, args = parse_lm(tmp_path, "--metric_for_best_model", "eval_perplexity")
    assert args.greater_is_better is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metric", "accuracy"], "--metric applies to --task classification only"),
        (["--label_column", "label"], "--label_column applies to --task classification only"),
        (["--group_by_length"], "--group_by_length does nothing with packing"),
        (
            ["--metric_for_best_model", "accuracy"],
            "'accuracy' is not reported by --task causal-lm; use one of eval_loss",
        ),
    ],
)
def test_flags_that_mean_nothing_for_a_causal_lm(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_lm(tmp_path, *extra)


def test_packing_flag_is_causal_lm_only(tmp_path):
    with pytest.raises(ConfigError, match="--packing applies to --task causal-lm only"):
        parse(["--model", "tiny-bert", "--packing", "false", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="--packing applies to --task causal-lm only"):
        parse(["--model", "tiny-bert", "--no_packing", "--output_dir", str(tmp_path)])
    script, _ = parse_lm(tmp_path, "--packing", "false", "--group_by_length")
    assert script.packing is False
    assert script.group_by_length
    assert parse_lm(tmp_path, "--no_packing")[0].packing is False
    assert parse_lm(tmp_path, "--packing")[0].packing is True


def test_padding_mode_trains_and_reports_perplexity_in_process(tmp_path):
    """The whole recipe without DeepSpeed (a few seconds): padded documents, eval loss and perplexity."""
    from ftprof.train.run import main

    out = tmp_path / "out"
    metrics = main(
        [
            *("--task", "causal-lm", "--model", "tiny-qwen2", "--dataset", "synthetic", "--packing", "false"),
            *("--max_train_samples", "64", "--max_eval_samples", "32", "--max_length", "32", "--max_steps", "4"),
            *("--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no"),
            *("--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true"),
        ]
    )
    assert metrics["eval_samples"] == 32
    assert "eval_accuracy" not in metrics
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)
    train = json.loads((out / "train_results.json").read_text())
    assert (train["packing"], train["block_size"], train["train_samples"]) == (False, 32, 64)


def test_hub_dataset_offline_is_one_line_error(tmp_path, capsys):
    from ftprof.cli.train import main

    out = tmp_path / "out"
    code = main(["--task", "causal-lm", "--model", "tiny-llama", "--dataset", "wikitext", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("ftprof: error: --dataset 'wikitext' can't be loaded from the Hugging Face Hub")
    assert not out.exists()
