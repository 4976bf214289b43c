"""The ablation vocabulary shared by interventions and circuits: what stands in for an activation.

Problem: ``fxlens.Ablate(how=...)`` replaces a site's value and ``circuits.run_with_edges(ablation=...)``
replaces what senders write; both offer "zero", "mean", "resample" and patching from another run.
Written twice, the two drift (one resampled with replacement, the other without; one averaged padding
positions, the other did not).

Mechanism: ``replacement(how, reference, ...)`` turns a name and the reference run's values
``[n, ...]`` into the values that stand in for the ablated activation:

- ``"zero"``: zeros;
- ``"mean"``: the mean over the reference rows, position by position; with ``reference_mask``
  ([n, pos]) only rows whose position is a real token count (a padded position is not an activation);
- ``"resample"``: for each of ``batch`` rows, a reference row drawn with a seeded generator;
- ``"corrupted"``: the reference values themselves (one reference row per row, or one for all).

In-batch variants (``Ablate(how="mean")`` with no reference averages the batch itself) run inside the
graph and are the interventions module's business; this module only needs the reference values.

Example::

    alt = replacement("mean", sender_values(model, ref_tokens), batch=4, reference_mask=ref_mask)
"""

from __future__ import annotations

import torch

__all__ = ["ABLATIONS", "AblationError", "replacement", "masked_mean"]

ABLATIONS = ("zero", "mean", "resample", "corrupted")


class AblationError(ValueError):
    pass


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None, pos_axis: int | None = 1) -> torch.Tensor:
    """Mean over axis 0 (rows) keeping it; where ``mask`` ([rows, pos]) is 0 a row does not count.

    A position no row covers keeps the plain mean (there is nothing better to stand in for it).
    """
    if mask is None or pos_axis is None or bool(mask.all()):
        return values.mean(0, keepdim=True)
    shape = [1] * values.dim()
    shape[0], shape[pos_axis] = mask.shape[0], mask.shape[1]
    w = mask.to(values.dtype).reshape(shape)
    count = w.sum(0, keepdim=True)
    mean = (values * w).sum(0, keepdim=True) / count.clamp_min(1)
    return torch.where(count > 0, mean, values.mean(0, keepdim=True))


def replacement(how: str, reference: torch.Tensor | None, *, batch: int, seed: int = 0,
                reference_mask: torch.Tensor | None = None, pos_axis: int | None = 1, what: str = "the ablation",
                like: torch.Tensor | None = None) -> torch.Tensor:
    """The stand-in values for ``how`` (see the module docstring): [1 or batch, ...].

    ``like`` gives the shape (without batch), dtype and device of a zero ablation when no reference is
    given; ``what`` names the request in messages.
    """
    if not isinstance(how, str) or how not in ABLATIONS:
        raise AblationError(f"{what}: the ablation must be one of {', '.join(map(repr, ABLATIONS))}; got {how!r}")
    if how == "zero":
        source = reference if reference is not None else like
        if source is None:
            raise AblationError(f"{what}: a zero ablation needs the activation's shape")
        return torch.zeros((1, *source.shape[1:]), dtype=source.dtype, device=source.device)
    if reference is None:
        raise AblationError(f"{what}: how={how!r} needs reference activations (reference=...: another run's cache, tokens or tensor)")
    n = reference.shape[0]
    if reference_mask is not None and tuple(reference_mask.shape) != (n, reference.shape[pos_axis] if pos_axis is not None else 0):
        raise AblationError(f"{what}: the reference mask has shape {tuple(reference_mask.shape)}; the reference has {n} rows")
    if how == "mean":
        return masked_mean(reference, reference_mask, pos_axis)
    if how == "resample":
        g = torch.Generator().manual_seed(seed)
        return reference[torch.randint(0, n, (batch,), generator=g).to(reference.device)]
    if n not in (1, batch):
        raise AblationError(
            f"{what}: how='corrupted' takes each row's value from the same row of the reference run, which has "
            f"{n} rows for {batch}; give a reference of {batch} rows (or 1), or use how='mean' / 'resample'"
        )
    return reference
