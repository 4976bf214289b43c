"""Text <-> tokens with TransformerLens' conventions (prepend BOS, right padding).

Problem: a researcher passes text, a list of texts, or token ids, and expects ``to_tokens`` to behave
as in TransformerLens: a BOS token first (when the tokenizer has one), right padding for batches, and
an attention mask that marks the padding.

Example::

    tok = Tokens(hf_tokenizer)
    ids, mask = tok.encode(["The cat", "A much longer sentence"])
    tok.to_str_tokens("The cat")       # ['<|endoftext|>', 'The', ' cat']
"""

from __future__ import annotations

import torch

__all__ = ["Tokens", "TokenizerMissing"]


class TokenizerMissing(RuntimeError):
    pass


class Tokens:
    def __init__(self, tokenizer, device=None):
        self.tokenizer = tokenizer
        self.device = device or torch.device("cpu")

    def _need(self):
        if self.tokenizer is None:
            raise TokenizerMissing(
                "this model has no tokenizer: pass token ids (a LongTensor [batch, pos]), or give one with "
                "Model.from_hf(model, tokenizer=AutoTokenizer.from_pretrained(...))"
            )
        return self.tokenizer

    @property
    def bos_token_id(self):
        tok = self.tokenizer
        return None if tok is None else tok.bos_token_id

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None), getattr(tok, "bos_token_id", None)):
            if cand is not None:
                return int(cand)
        return 0

    def encode(self, text, prepend_bos: bool = True, padding_side: str = "right"):
        """(ids [batch, pos], attention_mask [batch, pos]) for a string or a list of strings."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} is not a padding side: use 'left' or 'right'")
        tok = self._need()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("expected a string or a list of strings")
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos and self.bos_token_id is not None:
            rows = [[self.bos_token_id] + r for r in rows]
        if any(len(r) == 0 for r in rows):
            raise ValueError("an input tokenised to zero tokens; pass non-empty text or prepend_bos=True")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if padding_side == "left":
                ids[i, width - len(r) :] = torch.tensor(r)
                mask[i, width - len(r) :] = 1
            else:
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def to_string(self, tokens):
        tok = self._need()
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() == 0:
                return tok.decode([int(tokens)])
            if tokens.dim() == 1:
                return tok.decode(tokens.tolist())
            return [tok.decode(row.tolist()) for row in tokens]
        if isinstance(tokens, int):
            return tok.decode([tokens])
        if tokens and isinstance(tokens[0], (list, tuple)):
            return [tok.decode(list(r)) for r in tokens]
        return tok.decode(list(tokens))

    def to_str_tokens(self, value, prepend_bos: bool = True):
        tok = self._need()
        if isinstance(value, str):
            ids, _ = self.encode(value, prepend_bos=prepend_bos)
            ids = ids[0].tolist()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return [self.to_str_tokens(v, prepend_bos=prepend_bos) for v in value]  # one list per string
        elif isinstance(value, torch.Tensor):
            if value.dim() > 1:
                if value.shape[0] != 1:
                    return [self.to_str_tokens(row, prepend_bos=prepend_bos) for row in value]
                value = value[0]
            ids = value.tolist()
        else:
            ids = list(value)
        return [tok.decode([i]) for i in ids]

    def to_single_token(self, string: str) -> int:
        ids, _ = self.encode(string, prepend_bos=False)
        if ids.shape[1] != 1:
            pieces = self.to_str_tokens(string, prepend_bos=False)
            raise ValueError(f"{string!r} is {ids.shape[1]} tokens, not one: {pieces}")
        return int(ids[0, 0])
