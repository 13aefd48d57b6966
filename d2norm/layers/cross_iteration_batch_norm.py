"""Cross-Iteration Batch Normalization (CBN; Yao et al., arXiv 2002.05712), pure torch.

Per channel c, with y = W_t * x the output of the conv bound to this layer (no bias), M = N*H*W,
and a window of the current iteration t plus the valid stored iterations t-1 .. t-(k-1)
(k = ``buffer_size``; the official code's ``buffer_num`` is k - 1, so its buffer_num=3 is k=4):

    mu_t = E[y],  nu_t = E[y^2]                                   (only these carry gradient)
    mu_{t-r}(W_t) = mu_{t-r} + <dmu_{t-r}/dW, W_t - W_{t-r}>      (first-order compensation,
    nu_{t-r}(W_t) = nu_{t-r} + <dnu_{t-r}/dW, W_t - W_{t-r}>       all terms detached)
    nubar_i = max(nu_i(W_t), mu_i(W_t)^2)                         (the paper's clamp)
    mubar = mean_i mu_i,   sigma2bar = mean_i nubar_i - mubar^2   (over the n available entries)
    out = gamma * (y - mubar) / sqrt(sigma2bar + eps) + beta

The statistic gradients are analytic (no ``torch.autograd.grad``): dmu_c/dW_c = pbar, the mean
input patch (im2col column mean) of the group of channel c, and dnu_c/dW_c is the conv weight
gradient for grad_output = 2y/M (``aten.convolution_backward``); stride, padding, dilation and
groups are honoured. They are computed under ``no_grad`` in fp32 (fp64 for fp64 inputs), also
under AMP.

No weights are stored: for a conv without bias, <dmu/dW, W_{t-r}> = mu_{t-r} and
<dnu/dW, W_{t-r}> = 2 nu_{t-r} (y is linear in W), so the compensations are, exactly,
    mu_{t-r}(W_t) = <pbar_{t-r}, W_t>,   nu_{t-r}(W_t) = <dnu_{t-r}/dW, W_t> - nu_{t-r},
one dot product per channel and stored iteration.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import ConvFedNorm, EvalStatistics
from .conv_link import ModuleRef

# d2norm's messages go through the "d2norm" logger (not warnings.warn), so that the trainer's
# logger setup writes them to log.txt; without a handler they still reach stderr
logger = logging.getLogger(__name__)

__all__ = ["CrossIterationBatchNorm2d", "sqmean_weight_gradient"]

_STASH_KEY = "_d2norm_cbn_input"  # conv.__dict__ key holding the conv's input until the CBN runs
_OWNER_KEY = "_d2norm_cbn_owner"  # conv.__dict__ key: ModuleRef to the CBN bound to this conv
_HISTORY = ("hist_grad_sqmean", "hist_grad_mean", "hist_sqmean")
_UNUSED_HISTORY = ("hist_weight", "hist_mean")  # stored by an earlier layout; not needed (see top)


def _stash_conv_input(module, args):
    """Forward pre-hook on a bound conv: keep its input until the bound CBN consumes it.

    Stateless (reads nothing but its arguments), so a deep-copied or pickled conv keeps a correct
    hook. The CBN pops the tensor in its forward; it is never held across iterations."""
    if args:
        module.__dict__[_STASH_KEY] = args[0].detach()


_ModuleRef = ModuleRef  # the name earlier pickles refer to


def _check_int(value, name, key, minimum, fix):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"CrossIterationBatchNorm2d: {name} (config key {key}) must be an integer >= {minimum}, "
            f"got {value!r}. {fix}"
        )


class CrossIterationBatchNorm2d(ConvFedNorm, nn.Module):
    """Cross-Iteration Batch Normalization for the output of one ``nn.Conv2d`` (see module doc).

    Usage: ``cbn.bind(conv)`` (or ``d2norm.prepare_model(model)``, which calls
    ``prepare_preceding_conv``), then ``cbn(conv(x))``. The conv must have no bias, and must run
    right before this layer: a forward pre-hook on it hands its input to this layer.

    Args:
        num_features: channels C (= ``conv.out_channels``).
        buffer_size: k, iterations in the window including the current one (``D2NORM.CBN.BUFFER_SIZE``;
            1 is plain BN).
        burnin: the first ``burnin`` training iterations are plain BN (``D2NORM.CBN.BURNIN_ITERS``).
            History is recorded during the last k-1 of them, so the window is full when burn-in ends.
        eps, momentum: as in ``nn.BatchNorm2d`` (running stats EMA: r = (1-momentum) r + momentum s).
        grad_through_compensation: differentiate the compensated past statistics w.r.t. the
            current conv weight (``D2NORM.CBN.GRAD_THROUGH_COMPENSATION``; see "Gradient" below).

    Behaviour and choices:

    * Paper, not the official code: compensated variances are clamped (nubar = max(nu, mu^2))
      instead of dropped, and the normalizer is sqrt(sigma2bar + eps), not sqrt(sigma2bar) + eps.
      sigma2bar is evaluated in the algebraically identical, cancellation-free form
      mean_i max(nu_i - mu_i^2, 0) + mean_i (mu_i - mubar)^2, the current entry using its
      directly computed (biased) batch variance.
    * Plain BN (batch statistics, biased variance to normalize; n = 1 below) during burn-in and
      whenever the history is empty (first iteration, k = 1, after ``reset_history``).
    * Speed: the normalization runs on ATen's fused batch-norm kernels (forward in eval form at
      (mubar, sigma2bar); backward = BN's backward with its batch means divided by n, see
      ``_WindowBatchNorm``); per recorded iteration the extra cost is one conv weight gradient
      (dnu/dW) plus O(|x| + k|W|) elementwise work (one read of the history). No double backward.
      Few kernels (a small step is launch-bound on a GPU): the batch mean and variance in one
      fused pass, the compensation of all k-1 stored iterations in one batched product each for
      mu and nu, the window statistics as one ``var_mean`` over the n means plus one
      matrix-vector product, the history slots written in place by the ops that compute them,
      pbar as two small products with cached tap matrices; 29 ATen kernel ops per conv + CBN
      step in the steady state (k = 4), against 9 for conv + BN + dnu/dW
      (``benchmarks/kernels.py``).
    * Running stats track the *window* statistics the model is trained with: running_mean <- mubar,
      running_var <- sigma2bar * nM/(nM-1) (n window entries, M values per channel in the current
      batch; for n = 1 torch BN's unbiased update). Eval: ``F.batch_norm`` with the running
      stats, an affine map; eval needs no bound conv.
    * Gradient (``grad_through_compensation=False``, the paper's and the official code's): only
      mu_t and nu_t carry gradient; the stored statistics, their weight gradients and the W_t
      they are evaluated at are constants. That gradient is not the gradient of the forward:
      the window statistics follow W_t through the compensation, so the output is (to first
      order) invariant to scaling / shifting y_c by W_c, but the gradient still moves W_c along
      those directions, by (1 - 1/n) of BN-without-normalization's amount; e.g.
      <W_c, dL/dW_c> = (1 - 1/n) (gamma_c dL/dgamma_c + gamma_c mu_c / sigma_c dL/dbeta_c),
      where BN has 0. ``grad_through_compensation=True`` also differentiates the compensated
      entries w.r.t. W_t (dmu_r/dW_c = pbar_r, dnu_r/dW_c = dnu_r/dW, through the clamp and the
      window mean; ``_compensation_weight_grad``), the exact gradient of the forward; the stored
      statistics stay constants. Only the bound conv's weight is compensated (as in the paper).
      A parametrized conv weight is read as ``conv.weight``.
    * State: every piece (iteration count, ring buffers, valid count, write position) is a
      persistent buffer, so a state_dict round trip mid-window continues exactly. The history is
      allocated by ``bind`` from ``conv.weight``'s shape (float32, float64 if the weight is);
      a checkpoint whose history does not fit (other k or conv shape, or keys dropped by a
      checkpointer) is accepted and the history is restarted, with a warning.
      History memory: (k-1) * (|W| + G*|W|/C + C) values (dnu/dW, pbar, nu). A checkpoint of
      the earlier layout that also stored weights and means (``hist_weight``, ``hist_mean``)
      loads and continues exactly; those two are not needed and are dropped.
    * Each training forward with a non-empty batch advances the iteration count (so the layer
      must not be re-run by activation checkpointing). An empty batch returns an empty output
      connected to the graph and changes no state.
    * DDP: statistics are per process, as in the paper (no synchronization). Use
      ``broadcast_buffers=False`` (detectron2's trainer does) or rank 0's buffers, history
      included, overwrite the others' at every forward.
    """

    conv_requirement = "the conv whose output it normalizes (it reads that conv's input and weight)"
    conv_without_bias = True  # the window statistics are linear in the conv weight
    #: the history ring buffers (their shape follows buffer_size and the bound conv)
    history_buffers = _HISTORY

    def __init__(
        self, num_features, buffer_size=3, burnin=0, eps=1e-5, momentum=0.1, grad_through_compensation=False
    ):
        super().__init__()
        _check_int(
            num_features,
            "num_features",
            "the conv's out_channels",
            1,
            "Pass the number of output channels of the preceding conv.",
        )
        _check_int(
            buffer_size,
            "buffer_size",
            "D2NORM.CBN.BUFFER_SIZE",
            1,
            "Set D2NORM.CBN.BUFFER_SIZE to the number of iterations to average over, "
            "including the current one (the paper uses 3; 1 is plain BN).",
        )
        _check_int(
            burnin,
            "burnin",
            "D2NORM.CBN.BURNIN_ITERS",
            0,
            "Set D2NORM.CBN.BURNIN_ITERS to the number of initial training iterations that "
            "use plain BN (0 for none).",
        )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(
                f"CrossIterationBatchNorm2d: eps (config key D2NORM.CBN.EPS) must be a "
                f"number > 0, got {eps!r}. Set D2NORM.CBN.EPS, e.g. to 1e-5."
            )
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"CrossIterationBatchNorm2d: momentum (config key D2NORM.CBN.MOMENTUM) "
                f"must be a number in [0, 1], got {momentum!r}. Set "
                f"D2NORM.CBN.MOMENTUM, e.g. to 0.1."
            )
        self.num_features = num_features
        self.buffer_size = buffer_size
        self.burnin = burnin
        self.eps = float(eps)
        self.momentum = float(momentum)
        if not isinstance(grad_through_compensation, bool):
            raise ValueError(
                "CrossIterationBatchNorm2d: grad_through_compensation (config key "
                "D2NORM.CBN.GRAD_THROUGH_COMPENSATION) must be True or False, got "
                f"{grad_through_compensation!r}. Set "
                "D2NORM.CBN.GRAD_THROUGH_COMPENSATION to True or False."
            )
        self.grad_through_compensation = grad_through_compensation

        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # training forwards done; valid history entries; next ring slot to write
        self.register_buffer("num_iterations", torch.zeros((), dtype=torch.long))
        self.register_buffer("hist_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("hist_pos", torch.zeros((), dtype=torch.long))
        for name in _HISTORY:  # allocated by bind()
            self.register_buffer(name, torch.zeros(0))
        self._iter = 0  # host mirrors of the three long buffers (no .item() per forward)
        self._count = 0
        self._pos = 0
        self._conv_ref = ModuleRef()
        self._history_checked = False

    # ------------------------------------------------------------------ public state
    @property
    def iteration(self):
        """Number of training forwards (non-empty batches) done so far."""
        return self._iter

    @property
    def in_burnin(self):
        """True while the next training forward is a burn-in (plain BN) iteration."""
        return self._iter < self.burnin

    @property
    def bound_conv(self):
        return self._conv_ref()

    def extra_repr(self):
        return (
            f"{self.num_features}, buffer_size={self.buffer_size}, burnin={self.burnin}, "
            f"eps={self.eps}, momentum={self.momentum}, "
            f"grad_through_compensation={self.grad_through_compensation}"
        )

    def reset_running_stats(self):
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def reset_history(self):
        """Forget the stored iterations (the next training forward is plain BN and records)."""
        self._count = self._pos = 0
        self.hist_count.fill_(0)
        self.hist_pos.fill_(0)

    # ------------------------------------------------------------------ binding
    def prepare_preceding_conv(self, conv, shared=False):
        """The :class:`~d2norm.layers.base.ConvFedNorm` protocol: :meth:`bind`."""
        self.bind(conv, shared=shared)
        return conv

    @property
    def conv_prepared(self):
        return self._conv_ref() is not None

    def release_conv(self):
        """The :class:`~d2norm.layers.base.ConvFedNorm` protocol: :meth:`unbind`."""
        return self.unbind()

    @property
    def next_history_slot(self):
        """The ring slot (index into dim 0 of the history buffers) the next record writes."""
        return self._pos

    def eval_statistics(self):
        """The eval map: BN with the running statistics (see :mod:`d2norm.layers.base`)."""
        return EvalStatistics(self.weight, self.bias, self.running_mean, self.running_var, self.eps)

    def bind(self, conv, shared=False):
        """Link this layer to the ``nn.Conv2d`` whose output it normalizes (idempotent).

        Keeps only a weak reference (in detectron2 the norm is a child of the conv), registers a
        forward pre-hook on the conv that hands its input over, and allocates the history.
        ``shared=True``: other CBN layers bound with ``shared=True`` may normalize the same conv
        (per-call copies, e.g. one per FPN level in RetinaNet's head); each call of the conv
        must be followed by exactly one of them."""
        current = self._conv_ref()
        if current is conv:
            return self
        if current is not None:
            raise RuntimeError(
                f"{self._layer_name()} is already bound to another conv ({current!r}); "
                "a CrossIterationBatchNorm2d normalizes the output of exactly one conv."
            )
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(
                f"{self._layer_name()}: bind() expects an nn.Conv2d (or a subclass such "
                f"as detectron2.layers.Conv2d), got {type(conv).__name__}."
            )
        if getattr(conv, "transposed", False):
            raise ValueError(f"{self._layer_name()}: transposed convs are not supported.")
        if conv.bias is not None:
            raise ValueError(
                f"{self._layer_name()}: the conv before a CrossIterationBatchNorm2d must "
                "have no bias (bias=False); a bias before a BN-type norm is redundant."
            )
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{self._layer_name()}: only padding_mode='zeros' is supported, the conv "
                f"has padding_mode={conv.padding_mode!r}."
            )
        _conv_padding(conv)  # raises for unsupported 'same' padding
        if conv.out_channels != self.num_features:
            raise ValueError(
                f"{self._layer_name()}: num_features={self.num_features} but the conv has "
                f"out_channels={conv.out_channels}."
            )
        owner = conv.__dict__.get(_OWNER_KEY)
        other = owner() if owner is not None else None
        if other is not None and other is not self and not (shared and getattr(other, "_shared_bind", False)):
            raise RuntimeError(
                f"{self._layer_name()}: {conv!r} is already bound to another CrossIterationBatchNorm2d."
            )
        conv.__dict__[_OWNER_KEY] = ModuleRef(self)
        if not any(h is _stash_conv_input for h in conv._forward_pre_hooks.values()):
            conv.register_forward_pre_hook(_stash_conv_input)
        self._conv_ref = ModuleRef(conv)
        self._shared_bind = bool(shared)
        self._ensure_history(conv.weight)
        return self

    def unbind(self):
        """Undo :meth:`bind`: remove the conv's input hand-over (e.g. when this layer is replaced
        by a frozen one). Returns the conv that was bound, or None."""
        conv = self._conv_ref()
        self._conv_ref = ModuleRef()
        if conv is None:
            return None
        owner = conv.__dict__.get(_OWNER_KEY)
        if owner is not None and owner() in (self, None):
            conv.__dict__.pop(_OWNER_KEY, None)
            conv.__dict__.pop(_STASH_KEY, None)
            for key in [k for k, h in conv._forward_pre_hooks.items() if h is _stash_conv_input]:
                del conv._forward_pre_hooks[key]
        return conv

    def _layer_name(self):
        name = getattr(self, "_d2norm_name", None)
        return f"CrossIterationBatchNorm2d '{name}'" if name else repr(self)

    def _history_shapes(self, weight):
        c_out = weight.shape[0]
        fan_in = weight[0].numel()  # Cin/G * kh * kw; stored flat (3-D buffers are left alone
        # by model.to(memory_format=...))
        conv = self._conv_ref()
        groups = conv.groups if conv is not None else 1
        h = self.buffer_size - 1
        return {
            "hist_grad_sqmean": (h, c_out, fan_in),
            "hist_grad_mean": (h, groups, fan_in),
            "hist_sqmean": (h, c_out),
        }

    def _ensure_history(self, weight):
        """(Re)allocate the history if its buffers do not fit ``weight``; restart it then."""
        self._history_checked = True
        shapes = self._history_shapes(weight)
        h = self.buffer_size - 1
        fits = all(tuple(getattr(self, n).shape) == s for n, s in shapes.items())
        if fits and 0 <= self._count <= h and 0 <= self._pos < max(h, 1):
            return
        if self._count != 0:
            logger.warning(
                "%s: the stored CBN history does not fit the bound conv (different buffer_size or "
                "conv shape, or history dropped while loading a checkpoint); restarting the window.",
                self._layer_name(),
            )
        if not fits:
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            for name, shape in shapes.items():
                setattr(self, name, torch.zeros(shape, dtype=dtype, device=weight.device))
        self.reset_history()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Accept a history of any shape (checked against the conv at the next forward / bind).
        for name in _UNUSED_HISTORY:
            state_dict.pop(prefix + name, None)
        for name in _HISTORY:
            value = state_dict.get(prefix + name)
            mine = self._buffers[name]
            if isinstance(value, torch.Tensor) and value.shape != mine.shape:
                self._buffers[name] = torch.zeros(value.shape, dtype=mine.dtype, device=mine.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._iter = int(self.num_iterations.item())
        self._count = int(self.hist_count.item())
        self._pos = int(self.hist_pos.item())
        self._history_checked = False
        conv = self._conv_ref()
        if conv is not None:
            self._ensure_history(conv.weight)

    # ------------------------------------------------------------------ forward
    def forward(self, y):
        if y.dim() != 4:
            raise ValueError(f"{self._layer_name()}: expected a 4D input (N, C, H, W), got {y.dim()}D.")
        if y.shape[1] != self.num_features:
            raise ValueError(
                f"{self._layer_name()}: expected {self.num_features} channels, got {y.shape[1]}."
            )
        conv = self._conv_ref()
        x = conv.__dict__.pop(_STASH_KEY, None) if conv is not None else None
        if not self.training:  # the affine map of the running statistics
            yr = y if y.dtype == self.running_mean.dtype else y.to(self.running_mean.dtype)
            out = F.batch_norm(
                yr,
                self.running_mean,
                self.running_var,
                self.weight.to(yr.dtype),
                self.bias.to(yr.dtype),
                False,
                0.0,
                self.eps,
            )
            return out.to(y.dtype)
        if conv is None:
            raise RuntimeError(
                f"{self._layer_name()} is not bound to the conv whose output it normalizes. Call "
                "d2norm.prepare_model(model) after building the model (d2norm.build_model does), or "
                "cbn.bind(conv) for a standalone conv + CBN pair."
            )
        if y.numel() == 0:  # empty batch: connected to the graph, no state change
            return (y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(y.dtype)
        with torch.autocast(y.device.type, enabled=False):
            return self._forward_train(y, x, conv)

    def _forward_train(self, y, x, conv):
        t = self._iter
        k = self.buffer_size
        record = k > 1 and t >= self.burnin - (k - 1)
        if record and x is None:
            raise RuntimeError(
                f"{self._layer_name()} did not receive the input of its bound conv: the conv "
                "must run right before this layer, as in cbn(conv(x)) or detectron2's "
                "Conv2d(..., norm=cbn)."
            )
        if x is not None and (x.shape[0] != y.shape[0] or x.shape[1] != conv.in_channels):
            raise RuntimeError(
                f"{self._layer_name()}: the stashed conv input {tuple(x.shape)} does "
                f"not match this layer's input {tuple(y.shape)}; the bound conv must "
                "run right before this layer."
            )
        w_conv = conv.weight  # one access (a parametrized weight is computed once)
        if not self._history_checked:
            self._ensure_history(w_conv)
        sdt = torch.float64 if y.dtype == torch.float64 else torch.float32
        m_count = y.shape[0] * y.shape[2] * y.shape[3]
        h = self._count if t >= self.burnin else 0  # plain BN (h = 0) in burn-in / empty history
        comp = None
        n = h + 1
        if n * m_count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}"
            )
        with torch.no_grad():
            ys = y.detach().to(sdt)
            # batch mean and biased variance in one fused pass
            mu_t, var_t = torch.batch_norm_update_stats(ys, None, None, 0.0)
            if h == 0:
                mu_bar, var_bar = mu_t, var_t
            else:
                mu_p, nu_p = self._compensated_history(w_conv.detach().to(sdt), h, sdt)
                mu_p, nu_p = mu_p.t(), nu_p.t()  # (C, h) each
                var_p = torch.addcmul(nu_p, mu_p, mu_p, value=-1.0)
                if self.grad_through_compensation:
                    # d/dW of the stored entries (the history slots are overwritten below)
                    comp = (
                        self.hist_grad_mean[:h].to(sdt, copy=True),
                        self.hist_grad_sqmean[:h].to(sdt, copy=True),
                        mu_p.t(),
                        (var_p >= 0).t(),
                    )
                var_p.clamp_min_(0)  # the paper's max(nu, mu^2)
                # sigma2bar = mean_i max(nu_i, mu_i^2) - mubar^2, free of cancellation:
                # mean_i max(nu_i - mu_i^2, 0) + mean_i (mu_i - mubar)^2
                var_mu, mu_bar = torch.var_mean(torch.cat([mu_t.unsqueeze(1), mu_p], 1), 1, correction=0)
                var_bar = torch.addmv(var_mu, var_p, self._ones(h, sdt, y.device), alpha=1.0 / n)
                var_bar.add_(var_t, alpha=1.0 / n)
            total = n * m_count
            # running stats EMA, both in two ops
            run = [self.running_mean, self.running_var]
            torch._foreach_mul_(run, 1.0 - self.momentum)
            ones = self._ones(self.num_features, sdt, y.device)
            torch._foreach_addcmul_(
                run, [mu_bar, var_bar], [ones, ones], [self.momentum, self.momentum * total / (total - 1)]
            )
        out = _WindowBatchNorm.apply(
            y,
            self.weight,
            self.bias,
            mu_bar,
            var_bar,
            n,
            self.eps,
            w_conv if comp is not None else None,
            comp,
        )
        if record:
            with torch.no_grad():
                self._record(x, ys, conv, w_conv, mu_t, var_t, sdt)
        self._iter = t + 1
        self.num_iterations.fill_(self._iter)
        return out

    def _ones(self, size, dtype, device):
        """A cached ones vector (never written; not state)."""
        cache = self.__dict__.setdefault("_ones_cache", {})
        key = (size, dtype, device)
        t = cache.get(key)
        if t is None:
            t = cache[key] = torch.ones(size, dtype=dtype, device=device)
        return t

    def _compensated_history(self, w_t, h, sdt):
        """mu_{t-r}(W_t), nu_{t-r}(W_t) of the h stored iterations, each (h, C) (transposed views of
        (C, h) results), one batched matrix product each."""
        c_out = w_t.shape[0]
        groups = self.hist_grad_mean.shape[1]
        w = w_t.reshape(c_out, -1)  # (C, K)
        # mu: <pbar_g, W_c> for each channel c of group g; (G, C/G, K) @ (G, K, h)
        pbar = self.hist_grad_mean[:h].to(sdt).permute(1, 2, 0)
        mu = torch.bmm(w.view(groups, c_out // groups, -1), pbar).reshape(c_out, h)
        # nu: <dnu/dW_c, W_c> - nu; (C, h, K) @ (C, K, 1) - (C, h, 1)
        g_nu = self.hist_grad_sqmean[:h].to(sdt).transpose(0, 1)
        nu_stored = self.hist_sqmean[:h].to(sdt).t().unsqueeze(2)
        nu = torch.baddbmm(nu_stored, g_nu, w.unsqueeze(2), beta=-1.0).squeeze(2)
        return mu.t(), nu.t()

    def _record(self, x, ys, conv, w_conv, mu_t, var_t, sdt):
        """Store this iteration's dnu/dW, dmu/dW (= pbar) and nu in the ring buffer, in place."""
        w4 = w_conv.detach().to(sdt)
        xf = x.to(sdt)
        stride, padding, dilation = tuple(conv.stride), _conv_padding(conv), tuple(conv.dilation)
        i = self._pos
        g_nu = _sqmean_weight_gradient_unscaled(xf, ys, w4, stride, padding, dilation, conv.groups)
        m = ys.shape[0] * ys.shape[2] * ys.shape[3]
        torch.mul(g_nu, 2.0 / m, out=self.hist_grad_sqmean[i].view(g_nu.shape))
        # dmu_c/dW_c = pbar: the mean input patch of the group of channel c
        _mean_patch(
            xf, w4.shape, stride, padding, dilation, conv.groups, ys.shape[2:], out=self.hist_grad_mean[i]
        )
        torch.addcmul(var_t, mu_t, mu_t, out=self.hist_sqmean[i])
        h = self.buffer_size - 1
        self._pos = (i + 1) % h
        self.hist_pos.fill_(self._pos)
        if self._count < h:
            self._count += 1
            self.hist_count.fill_(self._count)


class _WindowBatchNorm(torch.autograd.Function):
    """out = gamma (y - mubar) / sqrt(sigma2bar + eps) + beta, where mubar / sigma2bar pool the
    batch statistics of y with n - 1 constant entries (mubar = (mu_t + c1)/n,
    sigma2bar = (E[y^2] + c2)/n - mubar^2). Its input gradient is BN's with the batch means of
    the backward divided by n:
        dy = invstd * (g - sum(g)/(nM) - yhat * sum(g yhat)/(nM)),  g = gamma * grad_out,
    i.e. (1/n) * [BN train-mode backward at (mubar, invstd)] + (1 - 1/n) * gamma * invstd * grad_out.
    Both terms come from ATen's fused batch-norm kernels. n = 1 is plain BN."""

    @staticmethod
    def forward(ctx, y, gamma, beta, mu_bar, var_bar, n, eps, conv_weight=None, comp=None):
        invstd = torch.rsqrt(var_bar + eps)
        ctx.save_for_backward(y, gamma, mu_bar, invstd)
        ctx.n, ctx.eps = n, eps
        ctx.comp = comp
        ctx.weight_meta = None if conv_weight is None else (conv_weight.shape, conv_weight.dtype)
        return F.batch_norm(
            y, mu_bar, var_bar, gamma.to(mu_bar.dtype), beta.to(mu_bar.dtype), False, 0.0, eps
        ).to(y.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, gamma, mu_bar, invstd = ctx.saved_tensors
        n = ctx.n
        mask = list(ctx.needs_input_grad[:3])
        want_w = ctx.comp is not None and ctx.needs_input_grad[7]
        if want_w:
            mask[1] = mask[2] = True  # sum(g * yhat) and sum(g) feed the compensation gradient
        gamma_s = gamma.to(mu_bar.dtype)
        # (1/n) [BN train-mode backward] = BN backward with weight gamma/n; the second term's
        # coefficient gamma*invstd; both per-channel vectors in one op
        if n > 1:
            gamma_n, coef = torch._foreach_mul([gamma_s, gamma_s], [_full_like(gamma_s, 1.0 / n), invstd])
        else:
            gamma_n = gamma_s
        if (
            not y.is_contiguous()
            and y.is_contiguous(memory_format=torch.channels_last)
            and not grad_out.is_contiguous(memory_format=torch.channels_last)
        ):
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        gy, ggamma, gbeta = torch.ops.aten.native_batch_norm_backward(
            grad_out,
            y,
            gamma_n,
            None,
            None,
            mu_bar,
            invstd,
            True,
            ctx.eps,
            mask,
        )
        if gy is not None and n > 1:
            gy = gy.addcmul_(grad_out, coef.to(gy.dtype).view(1, -1, 1, 1), value=1.0 - 1.0 / n)
        gw = None
        if want_w:
            gw = _compensation_weight_grad(ctx.comp, gamma_s, mu_bar, invstd, ggamma, gbeta, n)
            shape, dtype = ctx.weight_meta
            gw = gw.reshape(shape).to(dtype)
        if ggamma is not None:
            ggamma = ggamma.to(gamma.dtype) if ctx.needs_input_grad[1] else None
        if gbeta is not None:
            gbeta = gbeta.to(gamma.dtype) if ctx.needs_input_grad[2] else None
        return gy, ggamma, gbeta, None, None, None, None, gw, None


def _compensation_weight_grad(comp, gamma, mu_bar, invstd, sum_g_yhat, sum_g, n):
    """dL/dW_t through the compensated entries mu_r(W_t) = <pbar_r, W_t>, nu_r(W_t) = <dnu_r/dW, W_t> - nu_r.

    With dL/dmubar = -gamma invstd sum(g), dL/dsigma2bar = -gamma invstd^2 sum(g yhat) / 2 and
    sigma2bar = mean_i max(nu_i, mu_i^2) - mubar^2: dL/dmu_r = (dL/dmubar - 2 mubar dL/dsigma2bar)/n
    (+ 2 mu_r dL/dsigma2bar / n where the clamp is active), dL/dnu_r = dL/dsigma2bar / n (0 where
    it is active); dL/dW_c = sum_r dL/dmu_r[c] pbar_r + dL/dnu_r[c] dnu_r/dW_c."""
    pbar, g_nu, mu_p, unclamped = comp  # (h, G, K), (h, C, K), (h, C), (h, C)
    d_mu_bar = -gamma * invstd * sum_g
    d_var_bar = -0.5 * gamma * invstd * invstd * sum_g_yhat
    d_nu = torch.where(unclamped, d_var_bar / n, torch.zeros_like(mu_p))
    d_mu = (d_mu_bar - 2.0 * mu_bar * d_var_bar) / n + torch.where(
        unclamped, torch.zeros_like(mu_p), 2.0 * mu_p * d_var_bar / n
    )
    h, groups, k = pbar.shape
    c_out = mu_p.shape[1]
    gw = torch.einsum("hc,hck->ck", d_nu, g_nu)
    gw += torch.einsum("hgj,hgk->gjk", d_mu.view(h, groups, c_out // groups), pbar).reshape(c_out, k)
    return gw


def sqmean_weight_gradient(x, y, weight, stride, padding, dilation, groups):
    """dnu_c/dW_c for nu_c = E[y_c^2], y = conv(x, weight) (no bias): (2/M) sum_pos y_c * patch,
    the conv weight gradient for grad_output 2y/M, M = N*H_out*W_out; shaped like ``weight``."""
    m = y.shape[0] * y.shape[2] * y.shape[3]
    return _sqmean_weight_gradient_unscaled(x, y, weight, stride, padding, dilation, groups).mul_(2.0 / m)


def _sqmean_weight_gradient_unscaled(x, y, weight, stride, padding, dilation, groups):
    return torch.ops.aten.convolution_backward(
        y, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False]
    )[1]


_FULL = {}  # (value, size, dtype, device) -> constant vector (never written)


def _full_like(t, value):
    key = (value, t.shape[0], t.dtype, t.device)
    c = _FULL.get(key)
    if c is None:
        if len(_FULL) > 256:
            _FULL.clear()
        c = _FULL[key] = torch.full((t.shape[0],), value, dtype=t.dtype, device=t.device)
    return c


_TAPS = {}  # (size, kernel, stride, padding, dilation, out size, scale, dtype, device) -> matrix


def _tap_matrix(size, k, s, p, d, out, scale, dtype, device):
    """A (size, k) matrix: entry (r, i) = scale * #{q < out : i*d + q*s - p = r}, so that
    ``x @ A`` sums, for each kernel tap i, the input values that tap sees over the output
    positions (zero padding: the taps that fall outside are absent)."""
    key = (size, k, s, p, d, out, scale, dtype, device)
    a = _TAPS.get(key)
    if a is None:
        if len(_TAPS) > 256:
            _TAPS.clear()
        a = torch.zeros(size, k, dtype=torch.float64)
        for i in range(k):
            for q in range(out):
                r = i * d + q * s - p
                if 0 <= r < size:
                    a[r, i] += scale
        a = _TAPS[key] = a.to(dtype=dtype, device=device)
    return a


def _mean_patch(x, weight_shape, stride, padding, dilation, groups, out_hw, out=None):
    """pbar: mean over (batch, output positions) of the zero-padded input patch of each group,
    shape (G, Cin/G * kh * kw): ``A_h^T (mean_n x_n) A_w`` per input channel, with the tap
    matrices of :func:`_tap_matrix` (the 1/(H_out W_out) folded into A_w); three ops."""
    _, c_in_g, kh, kw = weight_shape
    (sh, sw), (ph, pw), (dh, dw), (ho, wo) = stride, padding, dilation, tuple(out_hw)
    c_in, h_in, w_in = x.shape[1:]
    a_h = _tap_matrix(h_in, kh, sh, ph, dh, ho, 1.0, x.dtype, x.device)
    a_w = _tap_matrix(w_in, kw, sw, pw, dw, wo, 1.0 / (ho * wo), x.dtype, x.device)
    rows = torch.matmul(x.mean(0), a_w)  # (Cin, H, kw)
    if out is None:
        out = x.new_empty(groups, c_in_g * kh * kw)
    torch.matmul(a_h.t(), rows, out=out.view(c_in, kh, kw))
    return out


def _conv_padding(conv):
    """The conv's padding as a pair of ints (symmetric 'same' / 'valid' resolved)."""
    p = conv.padding
    if isinstance(p, str):
        if p == "valid":
            return (0, 0)
        pads = []
        for d, kk in zip(conv.dilation, conv.kernel_size):
            total = d * (kk - 1)
            if total % 2:
                raise ValueError(
                    "CrossIterationBatchNorm2d: padding='same' with an even effective "
                    "kernel (asymmetric padding) is not supported; use explicit padding."
                )
            pads.append(total // 2)
        return tuple(pads)
    return tuple(p)


def conv_statistic_gradients(conv, x, y):
    """What CBN records per iteration for ``y = conv(x)`` (``conv`` without bias): dnu/dW (shaped
    like the weight; :func:`sqmean_weight_gradient`) and pbar = dmu/dW, the mean input patch of
    each group, shape (G, Cin/G * kh * kw). Public for benchmarks and reference checks."""
    stride, padding, dilation = tuple(conv.stride), _conv_padding(conv), tuple(conv.dilation)
    g_nu = sqmean_weight_gradient(x, y, conv.weight, stride, padding, dilation, conv.groups)
    pbar = _mean_patch(x, conv.weight.shape, stride, padding, dilation, conv.groups, y.shape[2:])
    return g_nu, pbar


def conv_nu_weight_gradient(conv, x, y):
    """dnu/dW alone for ``y = conv(x)``: the one conv weight gradient any exact CBN adds to conv +
    BN per training iteration (the "CBN floor" of the benchmarks)."""
    stride, padding, dilation = tuple(conv.stride), _conv_padding(conv), tuple(conv.dilation)
    return sqmean_weight_gradient(x, y, conv.weight, stride, padding, dilation, conv.groups)
