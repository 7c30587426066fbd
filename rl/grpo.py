"""GRPO math as pure functions on masked tensors: advantages, policy losses, rollout-mismatch
corrections, KL, aggregation, metrics.

What it does: everything the trainer computes between "rewards and log-probs are known" and
"call backward()". The trainer calls two functions:
    adv_B = compute_advantages(rewards_B, group_B, name="grpo")
    loss, metrics = grpo_loss(cfg, logp_BT=..., old_logp_BT=..., adv_B=..., mask_BT=...,
                              ref_logp_BT=..., rollout_logp_BT=..., entropy_BT=...)
Variants are chosen by name from `ADVANTAGES`, `POLICY_LOSSES`, `CORRECTIONS`, `KL_ESTIMATORS` and
`AGGREGATIONS`; which combinations make sense is checked once, when a `LossConfig` is built.
Groups: `group_B[i]` is the id of the prompt whose response row i is. Rows of a group may sit
anywhere in the batch (packing, filtering and async buffers reorder them) and groups may differ in
size. A group of one has no baseline to compare with: its advantage is 0, so it adds nothing to the
policy gradient, while its tokens still count in N_tok and in the KL and entropy terms.
Definitions (per token t of response i, with A_i its advantage):
  policy loss "grpo" (PPO clip, Schulman et al. 2017):
    ratio = exp(clamp(logp - old_logp, +-log_ratio_clamp))
    pg    = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))   (eps_high > eps_low is DAPO's
            "clip-higher", Yu et al. 2025)
    dual clip: where A < 0, pg = min(pg, -A c) with c > 1 (Ye et al. 2020, "Mastering Complex
            Control in MOBA Games with Deep RL")
  policy loss "gspo" (Zheng et al. 2025, "Group Sequence Policy Optimization", its GSPO-token form):
    s_i   = exp(mean_t (logp - old_logp)) over the response tokens of i (length-normalised sequence ratio)
    s_i,t = sg[s_i] exp(logp_t - sg[logp_t])       (value s_i; gradient s_i d logp_t)
    pg    = max(-A s_i,t, -A clip(s_i,t, 1 - gspo_eps_low, 1 + gspo_eps_high)): a sequence is clipped
            whole. Every token of i carries the same value, so with the seq-mean-token-mean aggregation
            (required) the loss is the paper's -J_GSPO and its gradient the paper's.
  rollout-mismatch corrections, from r = exp(clamp(old_logp - rollout_logp)) (trainer over engine;
  weights are detached and multiply pg only, never KL or entropy):
    tis              pg *= min(r_t, tis_cap)   (Yao et al. 2025, "Your efficient RL framework secretly
                     brings you off-policy RL training")
    masked_is_token  pg *= r_t 1[low <= r_t <= high]   (IcePop, Ring-1T report, arXiv 2510.18855)
    masked_is_seq    pg *= r_i 1[low <= r_i <= high] on every token of i, r_i = exp(mean_t log r_t)
                     (the geometric mean over i's response tokens)
  KL to the reference, from lr = clamp(logp - ref_logp): k1 = lr, k2 = lr^2 / 2,
          k3 = exp(-lr) + lr - 1 (Schulman, "Approximating KL divergence", 2020), clamped to
          +-kl_clamp
  loss  = agg(pg) + kl_coef agg(kl) - entropy_coef agg(entropy)
Aggregations (sums run over unmasked tokens; N_tok, N_seq, L may be passed in as global counts
so that micro-batch losses add up to the global-batch loss):
  token-mean                sum_{i,t} x / N_tok                  (default; DAPO)
  seq-mean-token-mean       sum_i (sum_t x / len_i) / N_seq      (GRPO paper; GSPO)
  seq-mean-token-sum        sum_i sum_t x / N_seq
  seq-mean-token-sum-norm   sum_i sum_t x / (N_seq L)            (Dr.GRPO, Liu et al. 2025)
What it leaves out: models, log-prob computation from a model, optimisers, distributed
reductions (metrics are local token means; the trainer averages them).
What breaks without it: the trainer would hold this math inline and untestable.

Shape legend: B sequences (responses) in the batch, P groups (prompts) among them; T response
tokens (padded, `mask_BT` is True on real tokens); V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rl.advantages import pick
from rl.corrections import CORRECTIONS, Correction, correction_weights
from rl.masked import masked_mean, masked_sum, sequence_mean

Tensor = torch.Tensor


# -- KL estimators (input: lr = logp - ref_logp, already clamped) ----------------------------
def kl_k1(log_ratio_BT: Tensor) -> Tensor:
    return log_ratio_BT


def kl_k2(log_ratio_BT: Tensor) -> Tensor:
    return 0.5 * log_ratio_BT.square()


def kl_k3(log_ratio_BT: Tensor) -> Tensor:
    return torch.exp(-log_ratio_BT) + log_ratio_BT - 1.0


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp_BT: Tensor, ref_logp_BT: Tensor, name: str = "k3",
               log_ratio_clamp: float = 20.0, kl_clamp: float = 10.0) -> Tensor:
    """Per-token KL(policy || reference) estimate, clamped to [-kl_clamp, kl_clamp]."""
    lr_BT = (logp_BT - ref_logp_BT).clamp(-log_ratio_clamp, log_ratio_clamp)
    return pick(KL_ESTIMATORS, name, "KL estimator")(lr_BT).clamp(-kl_clamp, kl_clamp)


# -- aggregations -----------------------------------------------------------------------------
def _token_mean(x_BT, mask_BT, num_tokens, num_seqs, norm_len):
    return masked_sum(x_BT, mask_BT) / num_tokens


def _seq_mean_token_mean(x_BT, mask_BT, num_tokens, num_seqs, norm_len):
    return sequence_mean(x_BT, mask_BT).sum() / num_seqs


def _seq_mean_token_sum(x_BT, mask_BT, num_tokens, num_seqs, norm_len):
    return masked_sum(x_BT, mask_BT) / num_seqs


def _seq_mean_token_sum_norm(x_BT, mask_BT, num_tokens, num_seqs, norm_len):
    return masked_sum(x_BT, mask_BT) / (num_seqs * norm_len)


AGGREGATIONS = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(x_BT: Tensor, mask_BT: Tensor, name: str = "token-mean", *, num_tokens: float | None = None,
              num_seqs: float | None = None, norm_len: float | None = None) -> Tensor:
    """Reduce a per-token quantity to a scalar with the aggregation `name` (module docstring).
    Defaults: num_tokens = unmasked tokens here, num_seqs = B, norm_len = T."""
    fn = pick(AGGREGATIONS, name, "aggregation")
    num_tokens = mask_BT.bool().sum().clamp(min=1) if num_tokens is None else num_tokens
    num_seqs = x_BT.shape[0] if num_seqs is None else num_seqs
    norm_len = x_BT.shape[1] if norm_len is None else norm_len
    return fn(x_BT, mask_BT, num_tokens, num_seqs, norm_len)


def loss_units(cfg, mask_BT: Tensor) -> int:
    """This batch's share of the aggregation's denominator: its unmasked tokens (token-mean) or its
    rows (the seq-mean variants). A loss computed with num_tokens = num_seqs = 1 (the numerator),
    divided by the sum of the units of all batches, is the global-batch loss (rl.schedule)."""
    return int(mask_BT.bool().sum()) if cfg.aggregation == "token-mean" else int(mask_BT.shape[0])


# -- per-token pieces -------------------------------------------------------------------------
def entropy_from_logits(logits_BTV: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) - sum softmax(z) z, in fp32."""
    z_BTV = logits_BTV.float()
    return torch.logsumexp(z_BTV, dim=-1) - (torch.softmax(z_BTV, dim=-1) * z_BTV).sum(-1)


def logprobs_from_logits(logits_BTV: Tensor, tokens_BT: Tensor) -> Tensor:
    """log softmax(logits)[token] per position, in fp32."""
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    return logp_BTV.gather(-1, tokens_BT.long().unsqueeze(-1)).squeeze(-1)


# -- policy losses: (pg_BT, facts) from log-probs and advantages ---------------------------------
def clipped_surrogate(ratio_BT: Tensor, adv_BT: Tensor, eps_low: float, eps_high: float,
                      dual_clip_c: float | None = None) -> tuple[Tensor, dict]:
    """max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high)), optionally dual-clipped, and the
    per-token facts its metrics are made of:
    {"ratio": ratio_BT, "clip_high": bool_BT, "clip_low": bool_BT, "dual_clip": bool_BT}."""
    pg1_BT = -adv_BT * ratio_BT
    pg2_BT = -adv_BT * ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg_BT = torch.maximum(pg1_BT, pg2_BT)
    facts = {"ratio": ratio_BT.detach(),
             "clip_high": (adv_BT > 0) & (ratio_BT > 1.0 + eps_high),
             "clip_low": (adv_BT < 0) & (ratio_BT < 1.0 - eps_low),
             "dual_clip": torch.zeros_like(ratio_BT, dtype=torch.bool)}
    if dual_clip_c is not None:
        pg3_BT = -adv_BT * dual_clip_c
        facts["dual_clip"] = (adv_BT < 0) & (pg_BT > pg3_BT)
        pg_BT = torch.where(adv_BT < 0, torch.minimum(pg_BT, pg3_BT), pg_BT)
    return pg_BT, facts


def ppo_clip_loss(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, eps_low: float, eps_high: float,
                  dual_clip_c: float | None = None, log_ratio_clamp: float = 20.0) -> tuple[Tensor, dict]:
    """GRPO's per-token clipped surrogate (token ratio exp(logp - old_logp)) and its facts."""
    ratio_BT = torch.exp((logp_BT - old_logp_BT).clamp(-log_ratio_clamp, log_ratio_clamp))
    return clipped_surrogate(ratio_BT, adv_BT, eps_low, eps_high, dual_clip_c)


def gspo_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor, log_ratio_clamp: float = 20.0) -> Tensor:
    """GSPO-token's s_i,t = sg[s_i] exp(logp_t - sg[logp_t]), s_i = exp(mean_t(logp - old_logp)):
    each token holds its sequence's ratio, with the gradient s_i d logp_t. Padding holds s_i with no
    gradient, whatever the padding's log-probs are."""
    m_BT = mask_BT.bool()
    log_s_B = sequence_mean((logp_BT - old_logp_BT).detach(), m_BT).clamp(-log_ratio_clamp, log_ratio_clamp)
    own_BT = torch.where(m_BT, logp_BT - logp_BT.detach(), torch.zeros_like(logp_BT))  # value 0, grad 1
    return torch.exp(log_s_B.unsqueeze(-1) + own_BT)


def gspo_loss(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, eps_low: float,
              eps_high: float, log_ratio_clamp: float = 20.0) -> tuple[Tensor, dict]:
    """GSPO's clipped surrogate on the sequence ratio (module docstring) and its facts (per token:
    every token of a clipped sequence counts as clipped, as in the paper's clipped-token fractions)."""
    return clipped_surrogate(gspo_ratio(logp_BT, old_logp_BT, mask_BT, log_ratio_clamp), adv_BT, eps_low, eps_high)


@dataclass(frozen=True)
class PolicyLoss:
    fn: Callable
    """(cfg, logp_BT, old_logp_BT, adv_BT, mask_BT) -> (pg_BT, facts)"""
    level: str
    """what one importance ratio covers: "token" or "sequence" (LossConfig checks the rest agrees)"""


def _grpo(cfg, logp_BT, old_logp_BT, adv_BT, mask_BT):
    return ppo_clip_loss(logp_BT, old_logp_BT, adv_BT, cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c,
                         cfg.log_ratio_clamp)


def _gspo(cfg, logp_BT, old_logp_BT, adv_BT, mask_BT):
    return gspo_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, cfg.gspo_clip_eps_low, cfg.gspo_clip_eps_high,
                     cfg.log_ratio_clamp)


POLICY_LOSSES = {"grpo": PolicyLoss(_grpo, "token"), "gspo": PolicyLoss(_gspo, "sequence")}


def mismatch_metrics(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor) -> dict[str, Tensor]:
    """How far the rollout engine's log-probs are from the trainer's on the sampled tokens:
    k1 and k3 estimates of KL(rollout || trainer), and the mean / max absolute difference."""
    d_BT = (old_logp_BT - rollout_logp_BT).detach().float()
    m_BT = mask_BT.bool()
    abs_BT = torch.where(m_BT, d_BT.abs(), torch.zeros_like(d_BT))
    return {"mismatch/kl_k1": masked_mean(-d_BT, m_BT),
            "mismatch/kl_k3": masked_mean(kl_k3(-d_BT.clamp(-20.0, 20.0)), m_BT),
            "mismatch/abs_diff_mean": masked_mean(d_BT.abs(), m_BT),
            "mismatch/abs_diff_max": abs_BT.max() if abs_BT.numel() else abs_BT.sum()}


# -- the entry point --------------------------------------------------------------------------
@dataclass(frozen=True)
class LossConfig:
    policy_loss: str = "grpo"
    """name in POLICY_LOSSES: grpo (token ratio, PPO clip) or gspo (sequence ratio and clip, Zheng et al. 2025)"""
    clip_eps_low: float = 0.2
    """grpo: ratio floor is 1 - clip_eps_low (for A < 0)"""
    clip_eps_high: float = 0.2
    """grpo: ratio ceiling is 1 + clip_eps_high (for A > 0); > clip_eps_low is clip-higher (DAPO: 0.28)"""
    dual_clip_c: float | None = None
    """grpo: dual-clip bound c > 1 on -A * ratio for A < 0 (e.g. 3.0); None disables"""
    gspo_clip_eps_low: float = 3e-4
    """gspo: sequence-ratio floor is 1 - this (for A < 0); the GSPO paper's 3e-4"""
    gspo_clip_eps_high: float = 4e-4
    """gspo: sequence-ratio ceiling is 1 + this (for A > 0); the GSPO paper's 4e-4"""
    kl_coef: float = 0.0
    """weight of the KL-to-reference term; 0 means KL is only logged (if ref_logp is given)"""
    kl_estimator: str = "k3"
    """name in KL_ESTIMATORS: k1, k2, k3"""
    kl_clamp: float = 10.0
    """per-token KL estimates are clamped to [-kl_clamp, kl_clamp]"""
    log_ratio_clamp: float = 20.0
    """every log-ratio is clamped to +-this before exp"""
    aggregation: str = "token-mean"
    """name in AGGREGATIONS (gspo needs seq-mean-token-mean)"""
    norm_len: int | None = None
    """L for seq-mean-token-sum-norm (use the max response length); None uses T"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus (loss -= entropy_coef * agg(entropy)); needs entropy_BT"""
    correction: str = "none"
    """rollout/trainer mismatch correction in CORRECTIONS: none; tis (truncated IS); masked_is_token,
    masked_is_seq (IcePop: the ratio, per token or per sequence, weights the loss inside the band, masks it outside)"""
    tis_cap: float = 2.0
    """correction=tis: weight min(pi_trainer / pi_rollout, tis_cap) per token"""
    is_band_low: float = 0.5
    """correction=masked_is_*: a ratio pi_trainer / pi_rollout below this masks the token / sequence (IcePop: 0.5)"""
    is_band_high: float = 5.0
    """correction=masked_is_*: a ratio above this masks the token / sequence (IcePop: 5.0)"""

    def __post_init__(self):
        pick(KL_ESTIMATORS, self.kl_estimator, "LossConfig.kl_estimator")
        pick(AGGREGATIONS, self.aggregation, "LossConfig.aggregation")
        loss = pick(POLICY_LOSSES, self.policy_loss, "LossConfig.policy_loss")
        correction = pick(CORRECTIONS, self.correction, "LossConfig.correction")
        for low, high, name in ((self.clip_eps_low, self.clip_eps_high, "clip_eps"),
                                (self.gspo_clip_eps_low, self.gspo_clip_eps_high, "gspo_clip_eps")):
            if low < 0 or high < 0 or low >= 1:
                raise ValueError(f"LossConfig: need 0 <= {name}_low < 1 and {name}_high >= 0, got {low}, {high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"LossConfig.dual_clip_c must be > 1 (typically 3), got {self.dual_clip_c}")
        if self.tis_cap <= 0:
            raise ValueError(f"LossConfig.tis_cap must be > 0 (typically 2), got {self.tis_cap}")
        if not 0 < self.is_band_low < 1 < self.is_band_high:
            raise ValueError(f"LossConfig: is_band_low={self.is_band_low}, is_band_high={self.is_band_high}: need "
                             "0 < is_band_low < 1 < is_band_high (a band around ratio 1; IcePop uses 0.5 and 5)")
        if loss.level == "sequence":
            self._check_sequence_level(correction)

    def _check_sequence_level(self, correction: Correction) -> None:
        """A sequence-level ratio (gspo) with token-level devices would mix the two levels."""
        p = f"LossConfig: policy_loss={self.policy_loss!r} clips one ratio per sequence"
        if correction.level == "token":
            raise ValueError(f"{p}, but correction={self.correction!r} reweights single tokens; "
                             "use correction='masked_is_seq' or 'none'")
        if self.dual_clip_c is not None:
            raise ValueError(f"{p}; dual_clip_c={self.dual_clip_c} is GRPO's token-level dual clip: set it to null")
        if self.aggregation != "seq-mean-token-mean":
            raise ValueError(f"{p} and averages over sequences (GSPO paper): set aggregation='seq-mean-token-mean', "
                             f"not {self.aggregation!r}")

    @property
    def needs_rollout_logp(self) -> bool:
        """Whether the loss reads the rollout engine's log-probs (the correction does)."""
        return CORRECTIONS[self.correction].fn is not None


def _check_shapes(mask_BT: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != mask_BT.shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(t.shape)} but mask_BT has "
                             f"{tuple(mask_BT.shape)}; pass per-token tensors of the response tokens only")


def grpo_loss(cfg: LossConfig, *, logp_BT: Tensor, adv_B: Tensor, mask_BT: Tensor,
              old_logp_BT: Tensor | None = None, ref_logp_BT: Tensor | None = None,
              rollout_logp_BT: Tensor | None = None, entropy_BT: Tensor | None = None,
              num_tokens: float | None = None, num_seqs: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of one (micro-)batch (cfg.policy_loss, cfg.correction, KL, entropy) and its metrics
    (detached 0-d tensors, token means over this batch's unmasked tokens).

    logp_BT: log-probs of the sampled tokens under the policy being trained (with grad).
    adv_B: per-response advantages (or adv_BT, per token).
    old_logp_BT: the trainer's log-probs before this update; None means on-policy (logp.detach()).
    ref_logp_BT: reference-model log-probs; needed when kl_coef > 0, logged whenever given.
    rollout_logp_BT: the rollout engine's log-probs; gives mismatch metrics; needed by cfg.correction.
    entropy_BT: per-token entropy (entropy_from_logits); logged, and used if entropy_coef > 0.
    num_tokens / num_seqs: global-batch counts for the aggregation (see `aggregate`).
    Rows are whole responses: gspo and masked_is_seq average over each row's unmasked tokens.
    """
    old_logp_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT
    if adv_B.dim() == 1 and adv_B.shape[0] != logp_BT.shape[0]:
        raise ValueError(f"grpo_loss: adv_B has {adv_B.shape[0]} entries but logp_BT has "
                         f"{logp_BT.shape[0]} sequences; pass one advantage per response")
    adv_BT = adv_B.unsqueeze(-1).expand_as(logp_BT) if adv_B.dim() == 1 else adv_B
    _check_shapes(mask_BT, logp_BT=logp_BT, old_logp_BT=old_logp_BT, adv=adv_BT, ref_logp_BT=ref_logp_BT,
                  rollout_logp_BT=rollout_logp_BT, entropy_BT=entropy_BT)
    if cfg.kl_coef > 0 and ref_logp_BT is None:
        raise ValueError(f"LossConfig.kl_coef={cfg.kl_coef} needs ref_logp_BT; pass it or set kl_coef=0")
    if cfg.entropy_coef > 0 and entropy_BT is None:
        raise ValueError(f"LossConfig.entropy_coef={cfg.entropy_coef} needs entropy_BT; pass it or set 0")

    def agg(x_BT: Tensor) -> Tensor:
        return aggregate(x_BT, mask_BT, cfg.aggregation, num_tokens=num_tokens, num_seqs=num_seqs,
                         norm_len=cfg.norm_len)

    pg_BT, facts = POLICY_LOSSES[cfg.policy_loss].fn(cfg, logp_BT, old_logp_BT, adv_BT, mask_BT)
    metrics = _clip_metrics(facts, logp_BT, old_logp_BT, mask_BT)
    if rollout_logp_BT is not None:
        metrics.update(mismatch_metrics(old_logp_BT, rollout_logp_BT, mask_BT))
    w_BT, correction_metrics = correction_weights(cfg, old_logp_BT, rollout_logp_BT, mask_BT)
    if w_BT is not None:
        pg_BT = pg_BT * w_BT.to(pg_BT.dtype)
    metrics.update(correction_metrics)
    pg_loss = agg(pg_BT)
    loss = pg_loss
    if ref_logp_BT is not None:
        kl_BT = kl_penalty(logp_BT, ref_logp_BT, cfg.kl_estimator, cfg.log_ratio_clamp, cfg.kl_clamp)
        metrics["kl"] = masked_mean(kl_BT.detach(), mask_BT)
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * agg(kl_BT)
    if entropy_BT is not None:
        metrics["entropy"] = masked_mean(entropy_BT.detach(), mask_BT)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * agg(entropy_BT)
    metrics["pg_loss"] = pg_loss.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def _clip_metrics(facts: dict, logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> dict[str, Tensor]:
    m_BT = mask_BT.bool()
    ratio_BT = facts["ratio"]
    lr_BT = (logp_BT - old_logp_BT).detach()
    clipped_BT = facts["clip_high"] | facts["clip_low"]
    return {
        "clip_frac": masked_mean(clipped_BT.float(), m_BT),
        "clip_frac_high": masked_mean(facts["clip_high"].float(), m_BT),
        "clip_frac_low": masked_mean(facts["clip_low"].float(), m_BT),
        "dual_clip_frac": masked_mean(facts["dual_clip"].float(), m_BT),
        "approx_kl": masked_mean(kl_k3(-lr_BT.clamp(-20.0, 20.0)), m_BT),
        "ratio_mean": masked_mean(ratio_BT, m_BT),
        "ratio_max": torch.where(m_BT, ratio_BT, torch.zeros_like(ratio_BT)).max(),
    }
