"""The tokenizer of a model folder: a byte-level BPE trained here, read back from tokenizer.json."""

import numpy as np
import pytest

from ufmjax.data.prompts import InputError
from ufmjax.models.hf.tokenizer import HFTokenizer, encode_texts, load_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "A happy dog is a joyful dog.",
          "Tokenizers split text into pieces; caf\u00e9 and na\u00efve have non-ASCII bytes."] * 20


def _train(folder, *, bos=True, truncate=None):
    """A byte-level BPE (GPT-2 style) with a BOS post-processor, saved as folder/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    if truncate:
        tok.enable_truncation(truncate)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "model"
    _train(folder)
    return folder


def test_encode_equals_tokenizers_own_encode_with_special_tokens(model_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok = load_tokenizer(model_dir)
    for text in ["The happy fox.", " leading space", "caf\u00e9", ""]:
        ids = tok.encode(text)
        assert ids == raw.encode(text).ids
        assert ids[0] == 0  # the post-processor's BOS, as transformers adds it by default
    assert raw.decode(tok.encode("The happy fox.")) == "The happy fox."


def test_token_strs_decode_each_id_alone(model_dir):
    tok = load_tokenizer(model_dir)
    V = tok.vocab_size
    assert 256 < V <= 320
    strs = tok.token_strs(V + 7)
    assert len(strs) == V + 7 and strs[V:] == [""] * 7
    assert strs[0] == "<s>" and strs[1] == "</s>"  # special tokens are kept
    happy = tok.tokenizer.encode(" happy", add_special_tokens=False).ids
    assert "".join(strs[i] for i in happy) == " happy"
    assert tok.token_strs(5) == strs[:5]
    assert tok.token_strs(V) is not tok.token_strs(V)  # a fresh list each call: the cache is not exposed


def test_check_vocab(model_dir):
    tok = load_tokenizer(model_dir)
    tok.check_vocab(tok.vocab_size)
    tok.check_vocab(tok.vocab_size + 64)  # padded embeddings are normal
    with pytest.raises(InputError, match=rf"tokenizer\.json in .*model has {tok.vocab_size} tokens but the model's "
                                         rf"embedding has only {tok.vocab_size - 1} rows$"):
        tok.check_vocab(tok.vocab_size - 1)


def test_missing_or_unreadable_tokenizer(tmp_path):
    with pytest.raises(InputError, match=r"^--hf: .*empty has no tokenizer\.json$"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match=r"^--hf: cannot read .*bad/tokenizer\.json: ") as info:
        HFTokenizer(bad)
    assert "\n" not in str(info.value)


def test_truncation_in_the_file_is_ignored(tmp_path):
    _train(tmp_path / "trunc", truncate=2)
    tok = load_tokenizer(tmp_path / "trunc")
    assert len(tok.encode("The quick brown fox jumps over the lazy dog.")) > 2


def test_encode_texts(tmp_path, model_dir):
    tok = load_tokenizer(model_dir)
    ids = encode_texts(tok, ["The fox.", "A dog"], "--positive")
    assert [a.dtype for a in ids] == [np.int32, np.int32]
    assert [a.tolist() for a in ids] == [tok.encode("The fox."), tok.encode("A dog")]
    _train(tmp_path / "nobos", bos=False)
    plain = load_tokenizer(tmp_path / "nobos")
    with pytest.raises(InputError, match=r"^--prompts: the text at index 1 \(''\) encodes to no token$"):
        encode_texts(plain, ["The fox.", ""], "--prompts")
