"""``FactoredMatrix``: a matrix kept as the product ``A @ B`` of two thin factors, as TransformerLens has it.

Problem: a head's OV circuit ``W_V @ W_O`` and QK circuit ``W_Q @ W_K.T`` are [d_model, d_model] matrices
of rank d_head. Forming them for every layer and head costs d_model^2 memory each, and their SVD or
eigenvalues computed densely cost d_model^3; both are cheap in the factored form.

Mechanism: keep ``A`` [..., ldim, mdim] and ``B`` [..., mdim, rdim] (leading axes broadcast: layer,
head). The SVD comes from the SVDs of the factors and of the small [mdim, mdim] middle matrix
``S_A V_A^T U_B S_B``; the eigenvalues of ``AB`` are those of ``BA`` (mdim x mdim) plus zeros; the
Frobenius norm is the root of the sum of squared singular values. Products with tensors or other
factored matrices stay factored, multiplying the cheaper side.

Example::

    OV = model.OV                              # FactoredMatrix [n_layers, n_heads, d_model, d_model]
    OV[1, 4].S                                 # singular values of layer 1, head 4, [d_head]
    (model.W_E @ OV[0, 0] @ model.W_U).AB      # full OV circuit of head 0.0, [d_vocab, d_vocab]

Gotchas: ``svd()`` returns ``(U, S, V)`` with ``M = U @ diag(S) @ V.T`` (V, not V^H), and ``Vh`` is V too,
exactly as in TransformerLens (whose ``Vh`` is a misnomer kept for its users); singular values number
``mdim`` (trailing zeros included when the factors are wider than the rank). 16-bit factors are upcast
to float32 for ``torch.linalg``. ``eigenvalues`` has mdim entries (the nonzero spectrum of ``AB``).
"""

from __future__ import annotations

from functools import cached_property

import torch

__all__ = ["FactoredMatrix"]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class FactoredMatrix:
    """``A @ B`` kept factored. See the module docstring."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.dim() < 2 or B.dim() < 2:
            raise ValueError(f"FactoredMatrix factors must be matrices (at least 2-D); got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix factors must match on the inner dimension; got A {tuple(A.shape)} and B {tuple(B.shape)}")
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as err:
            raise ValueError(f"the leading dimensions of A {tuple(A.shape)} and B {tuple(B.shape)} do not broadcast") from err
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.A = A.broadcast_to(*lead, self.ldim, self.mdim)
        self.B = B.broadcast_to(*lead, self.mdim, self.rdim)
        self.shape = torch.Size((*lead, self.ldim, self.rdim))
        self.has_leading_dims = len(lead) > 0

    # ---- shape and indexing ---------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> "FactoredMatrix":
        """Index the leading dimensions (layer, head); an index reaching the rows (or columns) selects rows of
        ``A`` (or columns of ``B``) and keeps a singleton axis where an int was given, as TransformerLens."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(i is Ellipsis or i is None for i in idx):
            raise IndexError("FactoredMatrix indexing takes ints, slices and index tensors (no ... or None)")
        lead = self.ndim - 2
        if len(idx) <= lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if len(idx) > self.ndim:
            raise IndexError(f"{len(idx)} indices for a FactoredMatrix of shape {tuple(self.shape)}")
        heads = idx[:lead]
        rows = _keep_axis(idx[lead])
        A = self.A[heads + (rows,)]
        B = self.B[heads]
        if len(idx) == self.ndim:
            B = B[(slice(None),) * (B.dim() - 2) + (slice(None), _keep_axis(idx[-1]))]
        return FactoredMatrix(A, B)

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    # ---- products ---------------------------------------------------------------------------------
    @property
    def AB(self) -> torch.Tensor:
        """The dense product [..., ldim, rdim] (ldim x rdim memory per matrix)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reverse product [..., mdim, mdim]; only for square matrices."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix; this one is {self.ldim} x {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.dim() < 2:  # a vector: the result is a vector
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply a FactoredMatrix of shape {tuple(self.shape)} by a tensor of shape {tuple(other.shape)}")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.dim() < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if other.shape[-1] != self.ldim:
            raise ValueError(f"cannot multiply a tensor of shape {tuple(other.shape)} by a FactoredMatrix of shape {tuple(self.shape)}")
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> "FactoredMatrix":
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError(f"* takes a scalar; got a tensor of shape {tuple(scalar.shape)} (use @ for products)")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # ---- spectra ----------------------------------------------------------------------------------
    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        A, B = _upcast(self.A), _upcast(self.B)
        Ua, Sa, Vha = torch.linalg.svd(A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)
        middle = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, Vhb.transpose(-2, -1) @ Vhm.transpose(-2, -1)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U [..., ldim, k], S [..., k], V [..., rdim, k]) with ``AB = U @ diag(S) @ V.T``."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        return self._svd[0]

    @property
    def S(self) -> torch.Tensor:
        return self._svd[1]

    @property
    def V(self) -> torch.Tensor:
        return self._svd[2]

    @property
    def Vh(self) -> torch.Tensor:
        """V (not its transpose), as TransformerLens' ``Vh``: ``AB = U @ diag(S) @ Vh.T``."""
        return self._svd[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The eigenvalues of the square matrix ``AB`` (complex, [..., mdim]): those of ``BA``."""
        return torch.linalg.eigvals(_upcast(self.BA))

    def norm(self) -> torch.Tensor:
        """The Frobenius norm of each matrix, [...]."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as ``(U sqrt(S)) @ (sqrt(S) V.T)``: both factors orthogonal and equally scaled."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.transpose(-2, -1))

    def collapse_l(self) -> torch.Tensor:
        """``diag(S) @ V.T`` [..., k, rdim]: the matrix with its left orthogonal factor removed."""
        return self.S[..., :, None] * self.V.transpose(-2, -1)

    def collapse_r(self) -> torch.Tensor:
        """``U @ diag(S)`` [..., ldim, k]."""
        return self.U * self.S[..., None, :]

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left k x k corner of every leading index's matrix (the first entry of each leading axis)."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(0, k) for _ in range(corner.dim()))]

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({tuple(self.shape)}), Hidden Dim({self.mdim})"


def _keep_axis(i):
    """An int index as a length-1 slice, so the indexed axis stays (the factors must stay matrices)."""
    if isinstance(i, int):
        return slice(i, i + 1) if i != -1 else slice(-1, None)
    return i
