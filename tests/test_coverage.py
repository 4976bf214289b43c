"""Every text model family of the installed transformers, wrapped as a new user would, against plain HF.

For each family of tests/all_families.py (a tiny random-weight model, 1-D weights perturbed), one case:

- ``fxlens.Model.from_hf(hf)``; if it raises, the family *refuses* and the message is checked against the
  substring recorded in tests/coverage_expected.json;
- logits of ``run_with_cache(ids, mask)`` against ``hf(input_ids=ids, attention_mask=mask).logits`` at
  the real positions of a right-padded and a left-padded batch of 2 rows (5 and 3 real tokens); a model
  whose forward takes no ``attention_mask`` (FNet, xLSTM) must refuse a padded batch with an InputError
  that says so, and is then checked on an unpadded batch;
- every ``blocks.{i}.hook_resid_pre`` against the hidden-states input of the i-th decoder-layer call (a
  ``register_forward_pre_hook(with_kwargs=True)`` on the module at ``model.graph.structure.blocks[i].path``;
  a layer called several times, as ALBERT's shared layer, gives one block per call) and the last block's
  ``hook_resid_post`` (``hook_normalized_resid_post`` where a post-norm layer outputs it normalised, as
  BERT's does) against that layer's output (a forward hook), so that the reference does not
  depend on what a family's ``output_hidden_states`` holds (Mamba's are the layers' outputs, XLM's last
  one is normalised); a sequence-first layer's [pos, batch, d] (XLNet, FSMT) is compared transposed;
- ``fxlens.patching.get_act_patch_resid_pre`` with a plain callable metric, on 1x5 tokens, against a loop
  of one HF forward per cell whose pre-hook on the decoder layer's call puts the clean layer input (read
  by the same kind of hook on a clean run) at the cell's position.

Tolerance: ``TOL`` (1e-5) relative to the scale of the reference compared, ``TOL * max(1, max |ref|)``
(``closeness``): float32 rounds a logit of size 40 or a sweep cell of size 46 to errors of about 1e-5.

A model that offers no block residual sites, and said why in the warning ``from_hf`` gave (several
residual streams: hyper-connections, AltUp; blocks over latents or positions of its own; a layer split
over parallel module lists; a stack of earlier residual states read beside the hidden states), *works
without residual sites*: its logits and the last block's raw module site (the layer's module path,
against its forward hook) are checked, and no sweep runs; the record's detail starts with
``WITHOUT_RESID`` and gives the reason. A residual site left out without that warning is a failure.

The outcome is *works* (every check holds), *refuses* (``from_hf`` raised) or *fails* (a check gives other
numbers, or fxlens raised after wrapping). The test asserts the outcome recorded in
tests/coverage_expected.json, so that an improvement and a regression both show: a recorded failure
is an ``xfail(strict=True)`` whose reason is the failure observed when the file was written.

Which families run: the suite runs ``SAMPLE`` (one or more of each kind: dense pre-norm, post-norm,
parallel blocks, ALiBi, encoders, mixture-of-experts, latent attention, state-space, hybrid,
encoder-decoder, and refusals), about a tenth of the families, so that CI stays short; set
``FXLENS_COVERAGE=all`` to run every family (about 15 minutes on 2 cores), as the recorded file and the
README's table were made.

Run one family (the docstring of ``observe`` says what a record holds)::

    FXLENS_COVERAGE=all PYTHONPATH=$PWD .venv/bin/python -m pytest -q -n 0 tests/test_coverage.py -k 'outcome and albert'

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
from fxlens.engine.inputs import InputError

TOL = 1e-5  # relative to the reference's scale: see ``closeness``
WITHOUT_RESID = "without residual sites"
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
    if a.dim() >= 2 and b.dim() == a.dim() and tuple(b.shape) == (a.shape[1], a.shape[0], *a.shape[2:]) \
            and a.shape[0] != a.shape[1]:
        b = b.transpose(0, 1)  # HF's sequence-first layers (XLNet, FSMT) hold [pos, batch, d]; fxlens shows [batch, pos, d]
    if tuple(a.shape) != tuple(b.shape):
        raise FamilyFails(f"shape {tuple(a.shape)} != HF's {tuple(b.shape)}")
    d = (a.detach().float() - b.detach().float()).abs()
    if where is not None:
        # the [batch, pos] mask indexes the two axes of that shape (Gemma-3n's residual is [altup, batch, pos, d])
        # without such axes (Perceiver's logits over its 64 output queries, CPM-Ant's prompt positions
        # prepended to the tokens) every value is compared, padded ones included: stricter, never looser
        k = next((k for k in range(d.dim() - 1) if tuple(d.shape[k:k + 2]) == tuple(where.shape)), None)
        if k is not None:
            d = d.movedim((k, k + 1), (0, 1))[where]
    return float(d.max()) if d.numel() else 0.0


def closeness(got, want, where=None) -> tuple[float, float]:
    """(max |got - want| at ``where``, the tolerance): ``TOL`` relative to the scale of the reference,
    ``TOL * max(1, max |want|)``, since float32 rounds a value of size 46 (a sweep's logit differences) or
    a large logit to about 46 times the error it gives a value of size 1."""
    d = maxdiff(got, want, where)
    scale = maxdiff(want, torch.zeros_like(want), where)
    return d, TOL * max(1.0, scale)


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


def _first_tensor(out):
    """A module's main output: the tensor itself, or the first tensor of a tuple or ModelOutput."""
    if torch.is_tensor(out):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return next((v for v in values if torch.is_tensor(v)), None)


def hf_forward(hf, ids, mask, layer_paths):
    """(HF output, [the i-th block's input], the last block's output) on a plain HF forward.

    Block ``i`` is the k-th call of the module at ``layer_paths[i]``, k counting the earlier blocks at that
    path (a layer called several times, as ALBERT's shared layer, is one block per call). The inputs are
    read by ``register_forward_pre_hook(with_kwargs=True)`` and the last output by a forward hook, so that
    the reference does not depend on what a family's ``output_hidden_states`` hands back (the layers'
    inputs, their outputs, the last one normalised)."""
    calls: dict = {p: [] for p in layer_paths}
    outputs: dict = {p: [] for p in layer_paths}
    handles = []
    for path in dict.fromkeys(layer_paths):
        module = hf.get_submodule(path)

        def pre(mod, args, kwargs, path=path):
            calls[path].append(_layer_input(args, kwargs)[1].detach().clone())

        def post(mod, args, kwargs, out, path=path):
            y = _first_tensor(out)
            outputs[path].append(y.detach().clone() if y is not None else None)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, **({} if mask is None else {"attention_mask": mask}))
    finally:
        for h in handles:
            h.remove()
    seen: dict = {}
    inputs, last = [], None
    for path in layer_paths:
        k = seen[path] = seen.get(path, -1) + 1
        if k >= len(calls[path]):
            raise FamilyFails(f"HF calls {path} {len(calls[path])} times, fewer than fxlens' blocks at that path")
        inputs.append(calls[path][k])
        last = outputs[path][k]
    for path in seen:
        if len(calls[path]) != seen[path] + 1:
            raise FamilyFails(f"HF calls {path} {len(calls[path])} times, fxlens has {seen[path] + 1} blocks there")
    return out, inputs, last


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


def _call_index(layer_paths, layer: int) -> int:
    """Which call of its module block ``layer`` is: the number of earlier blocks at the same path."""
    return sum(1 for p in layer_paths[:layer] if p == layer_paths[layer])


def _pos_axis(x, ids) -> int:
    """The positions axis of a layer input: the one after the batch axis, or 0 in a sequence-first
    [pos, batch, d] layer (XLNet)."""
    k = next((k for k in range(x.dim() - 1) if tuple(x.shape[k:k + 2]) == tuple(ids.shape)), None)
    if k is not None:
        return k + 1
    if tuple(x.shape[:2]) == (ids.shape[1], ids.shape[0]):
        return 0
    raise FamilyFails(f"the layer input {tuple(x.shape)} has no positions axis for token ids {tuple(ids.shape)}")


def hf_resid_pre_sweep(hf, clean, corrupted, layer_paths, metric, mask=None) -> torch.Tensor:
    """[n_layers, pos]: one HF forward of ``corrupted`` per cell, the clean layer input put at the cell's position
    (in every row; ``mask``: both runs' attention mask)."""
    _, clean_inputs, _ = hf_forward(hf, clean, mask, layer_paths)
    extra = {} if mask is None else {"attention_mask": mask}
    out = torch.zeros(len(layer_paths), clean.shape[1])
    for layer, path in enumerate(layer_paths):
        call = _call_index(layer_paths, layer)
        for pos in range(clean.shape[1]):
            count = [0]

            def pre(mod, args, kwargs, pos=pos, layer=layer, call=call, count=count):
                count[0] += 1
                if count[0] - 1 != call:
                    return None
                where, x = _layer_input(args, kwargs)
                x = x.clone()
                at = (slice(None),) * _pos_axis(x, clean) + (pos,)
                x[at] = clean_inputs[layer][at]
                return _replace(args, kwargs, where, x)

            handle = hf.get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True)
            try:
                with torch.no_grad():
                    out[layer, pos] = float(metric(hf(input_ids=corrupted, **extra).logits))
            finally:
                handle.remove()
    return out


# ---- one family ------------------------------------------------------------------------------------


RESID_SUFFIXES = ("hook_resid_pre", "hook_resid_post")


def inputs_for(side: str):
    """(ids, mask) of a check: a right- or left-padded batch, or ``"unpadded"`` (both rows real, no mask)."""
    if side == "unpadded":
        return A.probe_ids(2, SEQ, seed=2), None
    return padded_batch(side)


def resid_left_out(model, caught) -> str | None:
    """Why the model offers no residual sites, when it says so at wrap time (the reason is in the wrap-time
    warning: several stacked streams, latents instead of positions, a prompt prepended inside the model);
    None when it offers them. A residual site left out without that warning is a failure, not this."""
    left_out = model.graph.sites.left_out
    name = next((n for n in left_out if n.startswith("blocks.") and n.endswith(RESID_SUFFIXES)), None)
    if name is None:
        return None
    why = left_out[name]
    said = any(why in str(w.message) for w in caught)
    return f"{name}: {why}" if said else None


def _fxlens_side(model, side, sites):
    ids, mask = inputs_for(side)
    return model.run_with_cache(ids, mask, names_filter=sites)


def _check_side(hf, model, side, fx_out, layer_paths, resid: bool, problems):
    """Logits and the residual sites (or, without them, the blocks' raw module sites) of ``fx_out`` =
    (logits, cache) against a plain hooked HF forward of the same batch."""
    ids, mask = inputs_for(side)
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    logits, cache = fx_out
    try:
        out, inputs, last = hf_forward(hf, ids, mask, layer_paths)
    except FamilyFails:
        raise
    except Exception as err:  # noqa: BLE001 - HF itself takes no such batch: nothing to compare with
        problems.append(f"HF's own {side} forward raises {_first_line(err, 150)}")
        return
    d, tol = closeness(logits, out.logits, real)
    if not d <= tol:
        problems.append(f"{side} logits differ by {d:.3g}")
    n = len(layer_paths)
    if resid:
        pairs = [(f"blocks.{i}.hook_resid_pre", inputs[i]) for i in range(n)]
        # a post-norm layer (BERT) outputs its normalised residual: TransformerLens' hook_normalized_resid_post
        post = f"blocks.{n - 1}.hook_normalized_resid_post"
        pairs.append((post if post in cache else f"blocks.{n - 1}.hook_resid_post", last))
    else:
        # the raw site of the last block's module is its output as HF's forward hook sees it
        pairs = [(layer_paths[-1], last)]
    bad = []
    for name, want in pairs:
        if want is None:
            bad.append(f"{name}: HF's layer returns no tensor")
            continue
        d, tol = closeness(cache[name], want, real)
        if not d <= tol:
            bad.append(f"{name} {d:.3g}")
    if bad:
        problems.append(f"{side} {'residual' if resid else 'raw block'} sites differ: " + ", ".join(bad))


def sweep_metric(vocab_out: int):
    w = torch.randn(vocab_out, generator=torch.Generator().manual_seed(5))

    def metric(logits):
        return (logits[:, -1, :].float() @ w).mean()

    return metric


def _sides(model, record) -> tuple:
    """The batches to check: right- and left-padded, or unpadded when the model takes no attention_mask
    (checking first that a padded batch is refused with an InputError that says so)."""
    if "attention_mask" in model.captured.inputs:
        return ("right", "left")
    ids, mask = padded_batch("right")
    try:
        model(ids, mask)
    except InputError as err:
        if "takes no attention_mask" not in str(err):
            raise FamilyFails(f"a padded batch is refused with another message: {_first_line(err)}") from err
        record["notes"].append(f"takes no attention_mask: checked on unpadded input; a padded batch is refused ({err})")
        return ("unpadded",)
    raise FamilyFails("the model takes no attention_mask, yet a padded batch runs without an error")


def observe(family: str) -> dict:
    """{"status", "detail", "capture_s", "total_s", "warnings", "notes", "head"} of one family against plain HF.

    HF references that need hooks on the HF model are computed after the last fxlens call, so that fxlens
    never sees hooks come and go.
    """
    hf = A.build(family)
    if getattr(hf.config, "is_encoder_decoder", False):
        return observe_seq2seq(hf)
    record = {"head": type(hf).__name__, "warnings": [], "notes": []}
    problems: list[str] = []
    without = None
    with warnings.catch_warnings(record=True) as caught, time_limit(TIME_LIMIT_S):
        warnings.simplefilter("always")
        clean, corrupted = A.probe_ids(1, SEQ, seed=3), A.probe_ids(1, SEQ, seed=4)
        with torch.no_grad():
            metric = sweep_metric(hf(input_ids=clean).logits.shape[-1])
        start = time.perf_counter()  # total_s counts from the capture, as capture_s does
        model, outcome = _wrapped(hf, record)
        if outcome is not None:
            return outcome
        step = "structure"
        try:
            layer_paths = [b.path for b in model.graph.structure.blocks]
            n = len(layer_paths)
            without = resid_left_out(model, caught)
            post = f"blocks.{n - 1}.hook_normalized_resid_post"
            sites = ([f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
                     + ([post] if post in model.sites else []) if without is None else [layer_paths[-1]])
            step = "padding"
            sides = _sides(model, record)
            fx_outs = {}
            for side in sides:
                step = f"{side} run_with_cache"
                fx_outs[side] = _fxlens_side(model, side, sites)
            if without is None:
                step = "resid_pre sweep"
                _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
                got = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
            # the HF references, after the last fxlens call
            for side in sides:
                step = f"{side} HF reference"
                _check_side(hf, model, side, fx_outs[side], layer_paths, without is None, problems)
            if without is None:
                step = "hooked HF loop"
                want = hf_resid_pre_sweep(hf, clean, corrupted, layer_paths, metric)
                d, tol = closeness(got, want)
                if not d <= tol:
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
    if without is not None:
        record["notes"].append("logits and the last block's raw module site checked; no resid_pre sweep")
        return dict(record, status="works", detail=f"{WITHOUT_RESID} ({without})")
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
                d, tol = closeness(logits, out.logits)
                if not d <= tol:
                    problems.append(f"{side}-padded logits differ by {d:.3g}")
                for i in range(n):
                    d, tol = closeness(cache[sites[i]], out.decoder_hidden_states[i])
                    if not d <= tol:
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
    partly = outcome["detail"].startswith(WITHOUT_RESID)
    assert partly == exp["detail"].startswith(WITHOUT_RESID), (
        f"{family}: works {outcome['detail'] or 'with residual sites'}, recorded: works {exp['detail'] or 'with residual sites'}")
    if outcome["status"] == "refuses":
        assert exp["match"] in outcome["message"], f"{family} refuses with another message: {outcome['detail']}"


def test_expected_file_lists_every_family_and_skip():
    """A transformers upgrade that adds or removes a family shows here until the file is recorded again."""
    assert set(SAMPLE) <= set(A.FAMILIES)
    assert set(EXPECTED) == set(A.FAMILIES) | set(A.SKIPPED)
    for family, reason in A.SKIPPED.items():
        assert EXPECTED[family] == {"status": "skipped", "detail": reason}
