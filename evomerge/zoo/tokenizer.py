"""The zoo's word-level tokenizer, saved as an ordinary ``PreTrainedTokenizerFast``.

One token per whitespace-separated word, ids in the fixed order of ``languages.vocabulary()`` so
that token ids (and with them the aligned embeddings) never depend on corpus statistics. BOS is
added by the post-processor, exactly as lm-eval's default ``add_special_tokens`` encoding expects,
and decoding joins words with single spaces, so a correct generation decodes to the target string.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from evomerge.zoo.languages import BOS, EOS, PAD, vocabulary


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The zoo tokenizer (deterministic: a fixed vocabulary, no training statistics involved)."""
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=128,
    )
