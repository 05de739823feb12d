"""Token-level conventions shared by extraction and analysis."""

from __future__ import annotations


def bos_token_id(tokenizer) -> int:
    """The id prepended with `prepend_bos`: BOS for decoders, CLS for BERT-style encoders.

    ValueError when the tokenizer has neither (the extraction reports it as bad input)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    if token is None:
        raise ValueError("prepend_bos requested but the tokenizer has neither a BOS nor a CLS token")
    return int(token)
