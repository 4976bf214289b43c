"""TransformerLens' weight names read from the captured graph: the HF parameters themselves, as views.

Problem: TransformerLens code reads ``model.W_E``, ``model.W_U``, ``model.b_U`` (and helpers such as
``tokens_to_residual_directions`` and ``test_prompt`` built on them). fxlens keeps the HF model's
parameters, in HF's orientation, and must not copy them: an edit to the parameter must show.

Mechanism: the token embedding is the ``embedding`` node that reads ``input_ids`` (``graphs.vocab``);
its weight is the HF parameter [d_vocab, d_model]. The unembedding is the linear map nearest the
logits output, walking back through elementwise ops (Gemma 2's soft-capping, scalings): its weight
[d_vocab_out, d_model] is viewed transposed as TransformerLens' [d_model, d_vocab_out]. Both are read
from the captured program's own tensors, so a Model made with ``with_weight_edits`` shows its edits.

Example::

    model.W_U[:, model.to_single_token(" Paris")]     # the " Paris" direction, [d_model]

Gotchas: a head that is not one linear map over the final residual (none found within a few elementwise
ops) has no ``W_U``: asking raises with the reason. Embedding scalings that HF applies in the forward
(Gemma multiplies by sqrt(d_model)) are not folded in: ``W_E`` is the parameter.
"""

from __future__ import annotations

import functools

import torch

from ..graphs.nodes import op_name
from ..graphs.vocab import token_embedding

__all__ = ["embedding", "unembedding", "unembedding_node", "test_prompt"]

_PASS_THROUGH = {"mul", "div", "tanh", "add", "to", "_to_copy", "view", "reshape", "contiguous", "clone", "float"}


def _tensor(model, node) -> torch.Tensor:
    gm = model.derived.captured.module
    return functools.reduce(getattr, node.target.split("."), gm)


def embedding(model) -> torch.Tensor:
    node = token_embedding(model.derived.captured.module.graph)
    if node is None or node.args[0].op != "get_attr":
        raise AttributeError(f"W_E: no token embedding reads input_ids in {type(model.hf_model).__name__}")
    return _tensor(model, node.args[0])


def unembedding(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_U [d_model, d_vocab_out], b_U [d_vocab_out])."""
    node = unembedding_node(model)
    weight = _tensor(model, node.args[1])
    bias = node.args[2] if len(node.args) > 2 else None
    b = _tensor(model, bias) if getattr(bias, "op", None) == "get_attr" else torch.zeros(
        weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight.t(), b


def unembedding_node(model):
    """The ``linear`` node that computes the logits from the final residual stream (behind elementwise ops)."""
    graph = model.graph
    start = graph.structure.unembed
    name = type(model.hf_model).__name__
    if start is None:
        raise AttributeError(f"W_U: {name} has no head that computes logits")
    frontier, seen = [graph.dg.node(start)], set()
    for _ in range(6):
        nxt = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            if op_name(node) == "linear" and len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
                return node
            if node is graph.dg.node(start) or op_name(node) in _PASS_THROUGH:
                nxt += [a for a in node.all_input_nodes if a.op == "call_function"]
        frontier = nxt
    raise AttributeError(f"W_U: {name}'s logits are not one linear map of the final residual stream")


def test_prompt(model, prompt: str, answer: str, prepend_space_to_answer: bool, print_details: bool,
                prepend_bos, top_k: int) -> dict:
    if prepend_space_to_answer and not answer.startswith(" "):
        answer = " " + answer
    prompt_ids = model.to_tokens(prompt, prepend_bos=prepend_bos)
    answer_ids = model.to_tokens(answer, prepend_bos=False)
    ids = torch.cat([prompt_ids, answer_ids], dim=1)
    with torch.no_grad():
        logits = model(ids)[0].float()
    probs = logits.softmax(-1)
    n = prompt_ids.shape[1]
    rows = []
    for k in range(answer_ids.shape[1]):
        at = n - 1 + k
        token = int(answer_ids[0, k])
        rank = int((logits[at] > logits[at, token]).sum())
        rows.append({"token": model.to_string(token), "rank": rank, "logit": float(logits[at, token]),
                     "prob": float(probs[at, token])})
    top = logits[n - 1].topk(top_k)
    tops = [{"token": model.to_string(int(t)), "logit": float(v), "prob": float(probs[n - 1, int(t)])}
            for v, t in zip(top.values, top.indices)]
    if print_details:
        print("Tokenized prompt:", model.to_str_tokens(prompt_ids))
        print("Tokenized answer:", model.to_str_tokens(answer_ids))
        for r in rows:
            print(f"Performance on answer token:\nRank: {r['rank']: <8} Logit: {r['logit']:5.2f} Prob: {r['prob']:6.2%} Token: |{r['token']}|")
        for i, t in enumerate(tops):
            print(f"Top {i}th token. Logit: {t['logit']:5.2f} Prob: {t['prob']:6.2%} Token: |{t['token']}|")
    return {"answer": rows, "top": tops}
