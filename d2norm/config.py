"""``add_d2norm_config(cfg)``: the ``cfg.D2NORM`` node holding every method's options."""

from detectron2.config import CfgNode as CN

__all__ = ["add_d2norm_config"]


def add_d2norm_config(cfg):
    """Add d2norm's options to a detectron2 config (idempotent)."""
    if "D2NORM" in cfg:
        return cfg
    _C = cfg
    _C.D2NORM = CN()
    # Group Normalization (also used by "GN+WS"): number of groups, epsilon.
    _C.D2NORM.GN = CN()
    _C.D2NORM.GN.NUM_GROUPS = 32
    _C.D2NORM.GN.EPS = 1e-5
    # Weight Standardization (for "GN+WS" / "BN+WS" / "BCN+WS"), per output channel of the conv:
    #   CONVENTION "sqrt_var" (default):  W_hat = (W - mean) / sqrt(var_biased + EPS)
    #   CONVENTION "std_plus_eps":        W_hat = (W - mean) / (std_unbiased + EPS)
    #   CONVENTION "sqrt_unbiased_var":   W_hat = (W - mean) / sqrt(var_unbiased + EPS)
    # Use "std_plus_eps" for weights trained with mmcv's ConvWS2d / the original WS code, and
    # "sqrt_unbiased_var" for the BCN authors' ImageNet BCN+WS weights.
    _C.D2NORM.WS = CN()
    _C.D2NORM.WS.EPS = 1e-5
    _C.D2NORM.WS.CONVENTION = "sqrt_var"
    # Cross-Iteration BN: window of BUFFER_SIZE iterations (incl. the current one);
    # plain BN for the first BURNIN_ITERS training iterations. The official code's buffer_num
    # counts the previous iterations only: official buffer_num = BUFFER_SIZE - 1 (its
    # "buffer3" configs are BUFFER_SIZE 4).
    _C.D2NORM.CBN = CN()
    _C.D2NORM.CBN.BUFFER_SIZE = 3
    _C.D2NORM.CBN.BURNIN_ITERS = 0
    _C.D2NORM.CBN.EPS = 1e-5
    _C.D2NORM.CBN.MOMENTUM = 0.1
    # False: the paper's / official gradient (the compensated past statistics are constants);
    # True: also differentiate them w.r.t. the current conv weight (see docs/cbn_diagnosis.md).
    _C.D2NORM.CBN.GRAD_THROUGH_COMPENSATION = False
    # Moving-Average BN: BUFFER_SIZE = simulated batch / real batch per device.
    _C.D2NORM.MABN = CN()
    _C.D2NORM.MABN.BUFFER_SIZE = 16
    _C.D2NORM.MABN.WARMUP_ITERS = 100
    _C.D2NORM.MABN.MOMENTUM = 0.98
    _C.D2NORM.MABN.EPS = 1e-5
    # Batch Renormalization ("BRN"): r clipped to [1/r_max(t), r_max(t)], d to [-d_max(t), d_max(t)];
    # r_max ramps linearly 1 -> R_MAX and d_max 0 -> D_MAX from RAMP_START_ITER to R_MAX_END_ITER /
    # D_MAX_END_ITER (the paper's schedule: 5000 -> 40000 / 25000 steps). MOMENTUM is the update
    # rate of the running mean / std (the paper's fast update, 0.01). In schedules of a few hundred
    # iterations from scratch, 0.01 lags the weights and the r / d correction costs AP: use BN's
    # 0.1 there (docs/small_batch_study.md, "BRN's update rate").
    _C.D2NORM.BRN = CN()
    _C.D2NORM.BRN.R_MAX = 3.0
    _C.D2NORM.BRN.D_MAX = 5.0
    _C.D2NORM.BRN.RAMP_START_ITER = 5000
    _C.D2NORM.BRN.R_MAX_END_ITER = 40000
    _C.D2NORM.BRN.D_MAX_END_ITER = 25000
    _C.D2NORM.BRN.MOMENTUM = 0.01
    _C.D2NORM.BRN.EPS = 1e-5
    # Filter Response Normalization + TLU ("FRN"): eps = EPS (+ |learned eps| with LEARNABLE_EPS,
    # initialized to LEARNED_EPS_INIT). REPLACE_RELU: the TLU replaces the ReLU of the box / mask
    # head convs (see d2norm/layers/norm_sites.py for every call site).
    _C.D2NORM.FRN = CN()
    _C.D2NORM.FRN.EPS = 1e-6
    _C.D2NORM.FRN.LEARNABLE_EPS = False
    _C.D2NORM.FRN.LEARNED_EPS_INIT = 1e-4
    _C.D2NORM.FRN.REPLACE_RELU = True
    # EvoNorm-S0 ("EvoNorm-S0"): group std over NUM_GROUPS groups; REPLACE_RELU as for FRN.
    _C.D2NORM.EVONORM = CN()
    _C.D2NORM.EVONORM.NUM_GROUPS = 32
    _C.D2NORM.EVONORM.EPS = 1e-5
    _C.D2NORM.EVONORM.REPLACE_RELU = True
    # Batch-Channel Normalization ("BCN", "BCN+WS"; d2norm/layers/batch_channel_norm.py): a batch
    # normalization, then a group normalization with one affine per group.
    _C.D2NORM.BCN = CN()
    # Groups of the channel part (the authors' code: 32).
    _C.D2NORM.BCN.NUM_GROUPS = 32
    # Epsilon of both parts (the authors' code: 1e-5).
    _C.D2NORM.BCN.EPS = 1e-5
    # "estimate": micro-batch BCN, normalize with the estimated mean / variance (the paper's
    # Algorithm 1, the authors' EstBN); "batch": large-batch BCN, normalize with the batch's
    # statistics (BN). With several processes the statistics are those of the whole batch.
    _C.D2NORM.BCN.MODE = "estimate"
    # Update rate r of the estimates (running statistics), in (0, 1].
    _C.D2NORM.BCN.MOVING_SPEED = 0.1
    # "cumulative": r_t = max(r, 1/(t+1)) (the first step sets the estimates, then an average of
    # the steps so far until it reaches r); "constant": r_t = r from the first step. The authors'
    # code leaves r to the training script (its buffer starts at 0); see the layer's docstring.
    _C.D2NORM.BCN.MOVING_SPEED_SCHEDULE = "cumulative"
    # "group": one gamma, beta per group after the channel normalization (the authors' code);
    # "channel": one per channel (GN's usual affine).
    _C.D2NORM.BCN.AFFINE = "group"
    # Embedded synthetic dataset ("d2norm_shapes_{train,val}").
    _C.D2NORM.DATA = CN()
    _C.D2NORM.DATA.ROOT = ""  # "" -> $D2NORM_DATA or ~/.cache/d2norm/datasets
    return cfg
