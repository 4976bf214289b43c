"""Every text model family of the installed transformers, wrapped as a new user would, against plain HF.

For each family of tests/all_families.py (a tiny random-weight model, 1-D weights perturbed), one case:

- ``fxlens.Model.from_hf(hf)``; if it raises, the family *refuses* and the message is checked against the
  substring recorded in tests/coverage_expected.json;
- logits of ``run_with_cache(ids, mask)`` against ``hf(input_ids=ids, attention_mask=mask).logits`` at
  the real positions of a right-padded and a left-padded batch of 2 rows (5 and 3 real tokens), 1e-5;
- every ``blocks.{i}.hook_resid_pre`` against HF's ``output_hidden_states[i]`` and the last block's
  ``hook_resid_post`` against the last hidden state; where HF hands back the last one normalised (a norm
  module of the HF model outputs it exactly, found by plain forward hooks on every norm module), against
  that norm's input instead;
- ``fxlens.patching.get_act_patch_resid_pre`` with a plain callable metric, on 1x5 tokens, against a loop
  of one HF forward per cell whose ``register_forward_pre_hook(with_kwargs=True)`` on the decoder layer
  (the module at ``model.graph.structure.blocks[i].path``) puts the clean layer input (read by the same
  kind of hook on a clean run) at the cell's position.

The outcome is *works* (every check holds), *refuses* (``from_hf`` raised) or *fails* (a check gives other
numbers, or fxlens raised after wrapping). The test asserts the outcome recorded in
tests/coverage_expected.json, so that an improvement and a regression both show: a recorded failure
is an ``xfail(strict=True)`` whose reason is the failure observed when the file was written.

Which families run: the suite runs ``SAMPLE`` (one or more of each kind: dense pre-norm, post-norm,
parallel blocks, ALiBi, encoders, mixture-of-experts, latent attention, state-space, hybrid,
encoder-decoder, and refusals), about a tenth of the families, so that CI stays short; set
``FXLENS_COVERAGE=all`` to run every family (about 15 minutes on 2 cores), as the recorded file and the
README's table were made.

Record the outcomes again (after an fxlens change or a transformers upgrade), then regenerate the file
and the README's family table::

    FXLENS_COVERAGE_RECORD=/tmp/cov PYTHONPATH=$PWD .venv/bin/python -m pytest -q -n 2 tests/test_coverage.py
    .venv/bin/python scripts/family_table.py --record /tmp/cov
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import time
import warnings

import pytest
import torch

import all_families as A
import fxlens
from fxlens import patching

TOL = 1e-5
SEQ = 5
TIME_LIMIT_S = 60  # a family that takes this long is a failure (the target is ~5 s)
EXPECTED_PATH = pathlib.Path(__file__).with_name("coverage_expected.json")
EXPECTED = json.loads(EXPECTED_PATH.read_text()) if EXPECTED_PATH.exists() else {}
RECORD = os.environ.get("FXLENS_COVERAGE_RECORD")
SAMPLE = (
    "gpt2", "llama", "qwen2", "gpt_neox", "opt", "phi", "gemma2", "olmo2", "cohere", "falcon", "bloom", "mpt",
    "bert", "deberta-v2", "mixtral", "qwen3_moe", "olmoe", "deepseek_v2", "gpt_oss", "mamba", "mamba2", "jamba",
    "t5", "bart", "gemma3n_text",
)
RUN_ALL = RECORD or os.environ.get("FXLENS_COVERAGE") == "all"


class FamilyFails(AssertionError):
    """fxlens wrapped the model but gave other numbers than HF, or raised afterwards."""


# ---- inputs ----------------------------------------------------------------------------------------


def padded_batch(side: str):
    """Two rows of SEQ tokens: the first all real, the second with 3 real tokens on the other side of ``side``."""
    ids = A.probe_ids(2, SEQ, seed=2)
    mask = torch.ones_like(ids)
    if side == "right":
        mask[1, 3:] = 0
    else:
        mask[1, :2] = 0
    return ids, mask


def maxdiff(a, b, where=None) -> float:
    if tuple(a.shape) != tuple(b.shape):
        raise FamilyFails(f"shape {tuple(a.shape)} != HF's {tuple(b.shape)}")
    d = (a.detach().float() - b.detach().float()).abs()
    if where is not None:
        # the [batch, pos] mask indexes the two axes of that shape (Gemma-3n's residual is [altup, batch, pos, d])
        k = next((k for k in range(d.dim() - 1) if tuple(d.shape[k:k + 2]) == tuple(where.shape)), None)
        if k is None:
            raise FamilyFails(f"no [batch, pos] axes in shape {tuple(a.shape)}")
        d = d.movedim((k, k + 1), (0, 1))[where]
    return float(d.max()) if d.numel() else 0.0


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:limit]


def _timed_out(err: BaseException):
    """The TimeoutError of ``time_limit`` in ``err``'s chain of causes, or None."""
    while err is not None:
        if isinstance(err, TimeoutError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _wrapped(hf, record: dict):
    """(Model, None), with ``record["capture_s"]`` set; or (None, the record's outcome): a refusal, or a
    failure when the time limit fired inside capture (which reports torch's errors as its own)."""
    start = time.perf_counter()
    try:
        model = fxlens.Model.from_hf(hf)
    except Exception as err:  # noqa: BLE001 - a refusal is an outcome, its message is the detail
        took = round(time.perf_counter() - start, 2)
        if _timed_out(err):
            return None, dict(record, status="fails", detail=f"from_hf {_timed_out(err)}", capture_s=took)
        return None, dict(record, status="refuses", detail=_first_line(err), message=str(err), capture_s=took)
    record["capture_s"] = round(time.perf_counter() - start, 2)
    return model, None


@contextlib.contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---- plain HF references ---------------------------------------------------------------------------


def _is_norm(module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or "Norm" in type(module).__name__


def hf_forward(hf, ids, mask):
    """(HF output with hidden states, [(norm path, input, output)] of every norm module call, in order)."""
    calls = []
    handles = []
    for path, module in hf.named_modules():
        if path and _is_norm(module):
            def hook(mod, args, out, path=path):
                x = args[0] if args and torch.is_tensor(args[0]) else None
                y = out[0] if isinstance(out, tuple) else out
                if x is not None and torch.is_tensor(y):
                    calls.append((path, x.detach(), y.detach()))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out, calls


def hidden_states(out, blocks_path: str):
    """The hidden states of the stack fxlens takes for the blocks (a seq2seq output has two stacks)."""
    parts = blocks_path.split(".")
    if "decoder" in parts and getattr(out, "decoder_hidden_states", None) is not None:
        return out.decoder_hidden_states
    if "encoder" in parts and getattr(out, "encoder_hidden_states", None) is not None:
        return out.encoder_hidden_states
    return getattr(out, "hidden_states", None)


def _layer_input(args, kwargs):
    """(where, tensor) of a decoder layer's hidden-states input: ("arg", 0) or ("kw", name)."""
    if args and torch.is_tensor(args[0]):
        return ("arg", 0), args[0]
    if torch.is_tensor(kwargs.get("hidden_states")):
        return ("kw", "hidden_states"), kwargs["hidden_states"]
    for k, v in kwargs.items():
        if torch.is_tensor(v) and v.is_floating_point():
            return ("kw", k), v
    raise FamilyFails("the decoder layer's pre-hook sees no hidden-states tensor")


def _replace(args, kwargs, where, new):
    if where[0] == "arg":
        return (new,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, **{where[1]: new})


def hf_layer_inputs(hf, ids, layer_paths):
    """Each layer's hidden-states input on a plain HF forward (the first call of each layer)."""
    seen = {}
    handles = []
    for i, path in enumerate(layer_paths):
        def pre(mod, args, kwargs, i=i):
            if i not in seen:
                seen[i] = _layer_input(args, kwargs)[1].detach().clone()
        handles.append(hf.get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def hf_resid_pre_sweep(hf, clean, corrupted, layer_paths, metric) -> torch.Tensor:
    """[n_layers, pos]: one HF forward of ``corrupted`` per cell, the clean layer input put at the cell's position."""
    clean_inputs = hf_layer_inputs(hf, clean, layer_paths)
    out = torch.zeros(len(layer_paths), clean.shape[1])
    for layer, path in enumerate(layer_paths):
        for pos in range(clean.shape[1]):
            def pre(mod, args, kwargs, pos=pos, layer=layer):
                where, x = _layer_input(args, kwargs)
                x = x.clone()
                x[:, pos] = clean_inputs[layer][:, pos]
                return _replace(args, kwargs, where, x)

            handle = hf.get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True)
            try:
                with torch.no_grad():
                    out[layer, pos] = float(metric(hf(input_ids=corrupted).logits))
            finally:
                handle.remove()
    return out


# ---- one family ------------------------------------------------------------------------------------


def _check_padding(model, reference, side, problems):
    ids, mask = padded_batch(side)
    real = mask.bool()
    out, norm_calls = reference
    structure = model.graph.structure
    n_blocks = len(structure.blocks)
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(n_blocks)] + [f"blocks.{n_blocks - 1}.hook_resid_post"]
    logits, cache = model.run_with_cache(ids, mask, names_filter=sites)
    d = maxdiff(logits, out.logits, real)
    if not d <= TOL:
        problems.append(f"{side}-padded logits differ by {d:.3g}")
    hidden = hidden_states(out, structure.blocks_path)
    if hidden is None:
        problems.append("HF returns no hidden states to compare the residual sites with")
        return
    if len(hidden) != n_blocks + 1:
        problems.append(f"HF returns {len(hidden)} hidden states for fxlens' {n_blocks} blocks")
        return
    bad = []
    for i in range(n_blocks):
        d = maxdiff(cache[f"blocks.{i}.hook_resid_pre"], hidden[i], real)
        if not d <= TOL:
            bad.append(f"blocks.{i}.hook_resid_pre {d:.3g}")
    last = cache[f"blocks.{n_blocks - 1}.hook_resid_post"]
    d = maxdiff(last, hidden[-1], real)
    if not d <= TOL:
        # HF may hand back the last hidden state normalised: then compare with that norm's input
        normed = [(p, x) for p, x, y in norm_calls if y.shape == hidden[-1].shape and maxdiff(y, hidden[-1]) == 0]
        if normed and maxdiff(last, normed[-1][1], real) <= TOL:
            d = 0.0
        if not d <= TOL:
            where = f" (HF's last hidden state is the output of {normed[-1][0]})" if normed else ""
            bad.append(f"blocks.{n_blocks - 1}.hook_resid_post {d:.3g}{where}")
    if bad:
        problems.append(f"{side}-padded residual sites differ: " + ", ".join(bad))


def sweep_metric(vocab_out: int):
    w = torch.randn(vocab_out, generator=torch.Generator().manual_seed(5))

    def metric(logits):
        return (logits[:, -1, :].float() @ w).mean()

    return metric


def observe(family: str) -> dict:
    """{"status", "detail", "capture_s", "total_s", "warnings", "notes", "head"} of one family against plain HF.

    HF references that need hooks on the HF model are computed before wrapping it or after the last
    fxlens call, so that fxlens never sees hooks come and go.
    """
    hf = A.build(family)
    if getattr(hf.config, "is_encoder_decoder", False):
        return observe_seq2seq(hf)
    record = {"head": type(hf).__name__, "warnings": [], "notes": []}
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught, time_limit(TIME_LIMIT_S):
        warnings.simplefilter("always")
        references = {}
        for side in ("right", "left"):
            ids, mask = padded_batch(side)
            try:
                references[side] = hf_forward(hf, ids, mask)
            except Exception as err:  # noqa: BLE001 - HF itself takes no padding: nothing to compare with
                record["notes"].append(f"HF's own forward with a {side}-padded mask raises {_first_line(err, 150)}")
        clean, corrupted = A.probe_ids(1, SEQ, seed=3), A.probe_ids(1, SEQ, seed=4)
        with torch.no_grad():
            metric = sweep_metric(hf(input_ids=clean).logits.shape[-1])
        start = time.perf_counter()  # total_s counts from the capture, as capture_s does
        model, outcome = _wrapped(hf, record)
        if outcome is not None:
            return outcome
        step = "structure"
        try:
            for side, reference in references.items():
                step = f"{side}-padded run_with_cache"
                _check_padding(model, reference, side, problems)
            step = "resid_pre sweep"
            layer_paths = [b.path for b in model.graph.structure.blocks]
            _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
            got = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
            step = "hooked HF loop"  # after the last fxlens call
            want = hf_resid_pre_sweep(hf, clean, corrupted, layer_paths, metric)
            d = maxdiff(got, want)
            if not d <= TOL:
                spread = float(want.max() - want.min())
                problems.append(f"resid_pre sweep differs from the hooked HF loop by {d:.3g} (the grid spreads {spread:.3g})")
        except FamilyFails as err:
            problems.append(f"{step}: {err}")
        except Exception as err:  # noqa: BLE001 - an internal error after wrapping is a failure
            problems.append(f"{step} raises {_first_line(err)}")
    record["total_s"] = round(time.perf_counter() - start, 2)
    record["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                 if "site-packages" not in (w.filename or "")})
    if problems:
        return dict(record, status="fails", detail="; ".join(problems))
    return dict(record, status="works", detail="")


def observe_seq2seq(hf) -> dict:
    """An encoder-decoder: wrapped, its logits (decoder input = the same tokens) under right and left
    padding of the source, and the decoder's residual sites against HF's decoder hidden states. Its
    sweeps and patterns are checked against hooked HF in tests/test_encoder_decoder.py."""
    record = {"head": type(hf).__name__, "warnings": [], "notes": ["encoder-decoder: logits and decoder residual sites checked"]}
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught, time_limit(TIME_LIMIT_S):
        warnings.simplefilter("always")
        references = {}
        for side in ("right", "left"):
            ids, mask = padded_batch(side)
            try:
                with torch.no_grad():
                    references[side] = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ids, output_hidden_states=True)
            except Exception as err:  # noqa: BLE001
                record["notes"].append(f"HF's own forward with a {side}-padded mask raises {_first_line(err, 150)}")
        start = time.perf_counter()  # total_s counts from the capture, as capture_s does
        model, outcome = _wrapped(hf, record)
        if outcome is not None:
            return outcome
        try:
            for side, out in references.items():
                ids, mask = padded_batch(side)
                n = model.cfg.n_layers
                sites = [f"decoder.{i}.hook_resid_pre" for i in range(n)]
                logits, cache = model.run_with_cache(ids, ids, attention_mask=mask, names_filter=sites)
                d = maxdiff(logits, out.logits)
                if not d <= TOL:
                    problems.append(f"{side}-padded logits differ by {d:.3g}")
                for i in range(n):
                    d = maxdiff(cache[sites[i]], out.decoder_hidden_states[i])
                    if not d <= TOL:
                        problems.append(f"{side}-padded {sites[i]} differs by {d:.3g}")
        except FamilyFails as err:
            problems.append(str(err))
        except Exception as err:  # noqa: BLE001
            problems.append(f"raises {_first_line(err)}")
    record["total_s"] = round(time.perf_counter() - start, 2)
    record["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught if "site-packages" not in (w.filename or "")})
    if problems:
        return dict(record, status="fails", detail="; ".join(problems))
    return dict(record, status="works", detail="")


def _write_record(family: str, outcome: dict) -> None:
    folder = pathlib.Path(RECORD)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{family}.json").write_text(json.dumps(outcome, indent=1, default=str))


# ---- the cases ---------------------------------------------------------------------------------------


def _case(family: str):
    exp = EXPECTED.get(family, {})
    marks = []
    if exp.get("status") == "fails" and not RECORD:
        marks.append(pytest.mark.xfail(strict=True, raises=FamilyFails, reason=f"issue 10: {exp.get('detail', '')}"))
    return pytest.param(family, marks=marks, id=family)


@pytest.mark.parametrize("family", [_case(f) for f in A.FAMILIES if RUN_ALL or f in SAMPLE])
def test_family_outcome_is_as_recorded(family):
    try:
        A.build(family)
    except A.BuildError as err:
        if RECORD:
            _write_record(family, {"status": "cannot build", "detail": str(err), "head": A.head_class(family)[1]})
        pytest.skip(f"cannot build the tiny model: {err}")
    outcome = observe(family)
    if RECORD:
        _write_record(family, outcome)
        return
    exp = EXPECTED.get(family)
    assert exp is not None, f"{family} is not in {EXPECTED_PATH.name}; record it (see the module docstring)"
    if outcome["status"] == "fails":
        raise FamilyFails(outcome["detail"])
    assert outcome["status"] == exp["status"], f"{family}: {outcome['status']} ({outcome['detail']}), recorded {exp['status']}"
    if outcome["status"] == "refuses":
        assert exp["match"] in outcome["message"], f"{family} refuses with another message: {outcome['detail']}"


def test_expected_file_lists_every_family_and_skip():
    """A transformers upgrade that adds or removes a family shows here until the file is recorded again."""
    assert set(SAMPLE) <= set(A.FAMILIES)
    assert set(EXPECTED) == set(A.FAMILIES) | set(A.SKIPPED)
    for family, reason in A.SKIPPED.items():
        assert EXPECTED[family] == {"status": "skipped", "detail": reason}
