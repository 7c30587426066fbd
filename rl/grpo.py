"""GRPO math as pure functions on masked tensors: advantages, PPO-clip, KL, aggregation, metrics.

What it does: everything the trainer computes between "rewards and log-probs are known" and
"call backward()". The trainer calls two functions:
    adv_B = compute_advantages(rewards_B, group_size, name="grpo")
    loss, metrics = grpo_loss(cfg, logp_BT=..., old_logp_BT=..., adv_B=..., mask_BT=...,
                              ref_logp_BT=..., rollout_logp_BT=..., entropy_BT=...)
Variants are chosen by name from `ADVANTAGES`, `KL_ESTIMATORS` and `AGGREGATIONS`.
Definitions (per token t of response i, with A_i its advantage):
  ratio = exp(clamp(logp - old_logp, +-log_ratio_clamp))
  pg    = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))   (PPO, Schulman et al. 2017;
          eps_high > eps_low is DAPO's "clip-higher", Yu et al. 2025)
  dual clip: where A < 0, pg = min(pg, -A c) with c > 1 (Ye et al. 2020, "Mastering Complex
          Control in MOBA Games with Deep RL")
  KL to the reference, from lr = clamp(logp - ref_logp): k1 = lr, k2 = lr^2 / 2,
          k3 = exp(-lr) + lr - 1 (Schulman, "Approximating KL divergence", 2020), clamped to
          +-kl_clamp
  truncated IS for the rollout-engine vs trainer mismatch (Yao et al. 2025, "Your efficient RL
          framework secretly brings you off-policy RL training"): pg *= min(exp(old_logp -
          rollout_logp), tis_cap), weights detached
  loss  = agg(pg) + kl_coef agg(kl) - entropy_coef agg(entropy)
Aggregations (sums run over unmasked tokens; N_tok, N_seq, L may be passed in as global counts
so that micro-batch losses add up to the global-batch loss):
  token-mean                sum_{i,t} x / N_tok                  (default; DAPO)
  seq-mean-token-mean       sum_i (sum_t x / len_i) / N_seq      (GRPO paper)
  seq-mean-token-sum        sum_i sum_t x / N_seq
  seq-mean-token-sum-norm   sum_i sum_t x / (N_seq L)            (Dr.GRPO, Liu et al. 2025)
What it leaves out: models, log-prob computation from a model, optimisers, distributed
reductions (metrics are local token means; the trainer averages them).
What breaks without it: the trainer would hold this math inline and untestable.

Shape legend: B sequences (responses) in the batch, B = P * G for P prompts with G responses
each; T response tokens (padded, `mask_BT` is True on real tokens); V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


# -- masked reductions ----------------------------------------------------------------------
def masked_sum(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Sum over unmasked entries; padding never contributes, even if it holds inf or nan."""
    return torch.where(mask_BT.bool(), x_BT, torch.zeros_like(x_BT)).sum()


def masked_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean over unmasked entries (0 when there are none)."""
    return masked_sum(x_BT, mask_BT) / mask_BT.bool().sum().clamp(min=1)


# -- advantages -----------------------------------------------------------------------------
def _groups(rewards_B: Tensor, group_size: int) -> Tensor:
    if rewards_B.dim() != 1 or group_size < 1 or rewards_B.numel() % group_size:
        raise ValueError(
            f"rewards_B has shape {tuple(rewards_B.shape)} but group_size={group_size}: pass a 1-D tensor "
            "with the G responses of each prompt adjacent (B = P * G)")
    return rewards_B.float().view(-1, group_size)


def grpo_advantages(rewards_B: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """A_i = (r_i - mean_group r) / (std_group r + eps), std with Bessel's correction
    (DeepSeekMath, Shao et al. 2024). Groups of one or of equal rewards get A = 0."""
    r_PG = _groups(rewards_B, group_size)
    centred_PG = r_PG - r_PG.mean(dim=1, keepdim=True)
    if group_size == 1:
        return centred_PG.view(-1)
    std_P1 = r_PG.std(dim=1, keepdim=True)
    # A group of equal rewards has nothing to learn from: 0, also when eps = 0 (not 0/0).
    return torch.where(std_P1 > 0, centred_PG / (std_P1 + eps), torch.zeros_like(centred_PG)).view(-1)


def drgrpo_advantages(rewards_B: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """A_i = r_i - mean_group r, no std division (Dr.GRPO, Liu et al. 2025: the std term
    up-weights too easy and too hard prompts). `eps` is unused, kept for one signature."""
    r_PG = _groups(rewards_B, group_size)
    return (r_PG - r_PG.mean(dim=1, keepdim=True)).view(-1)


ADVANTAGES = {"grpo": grpo_advantages, "drgrpo": drgrpo_advantages}


def compute_advantages(rewards_B: Tensor, group_size: int, name: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Per-response advantages `adv_B` with the estimator registered as `name`."""
    return _pick(ADVANTAGES, name, "advantage")(rewards_B, group_size, eps)


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
    return _pick(KL_ESTIMATORS, name, "KL estimator")(lr_BT).clamp(-kl_clamp, kl_clamp)


# -- aggregations -----------------------------------------------------------------------------
def _token_mean(x_BT, mask_BT, num_tokens, num_seqs, norm_len):
    return masked_sum(x_BT, mask_BT) / num_tokens


def _seq_mean_token_mean(x_BT, mask_BT, num_tokens, num_seqs, norm_len):
    m_BT = mask_BT.bool()
    per_seq_B = torch.where(m_BT, x_BT, torch.zeros_like(x_BT)).sum(-1) / m_BT.sum(-1).clamp(min=1)
    return per_seq_B.sum() / num_seqs


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
    fn = _pick(AGGREGATIONS, name, "aggregation")
    num_tokens = mask_BT.bool().sum().clamp(min=1) if num_tokens is None else num_tokens
    num_seqs = x_BT.shape[0] if num_seqs is None else num_seqs
    norm_len = x_BT.shape[1] if norm_len is None else norm_len
    return fn(x_BT, mask_BT, num_tokens, num_seqs, norm_len)


# -- per-token pieces -------------------------------------------------------------------------
def entropy_from_logits(logits_BTV: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) - sum softmax(z) z, in fp32."""
    z_BTV = logits_BTV.float()
    return torch.logsumexp(z_BTV, dim=-1) - (torch.softmax(z_BTV, dim=-1) * z_BTV).sum(-1)


def logprobs_from_logits(logits_BTV: Tensor, tokens_BT: Tensor) -> Tensor:
    """log softmax(logits)[token] per position, in fp32."""
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    return logp_BTV.gather(-1, tokens_BT.long().unsqueeze(-1)).squeeze(-1)


def ppo_clip_loss(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, eps_low: float, eps_high: float,
                  dual_clip_c: float | None = None, log_ratio_clamp: float = 20.0) -> tuple[Tensor, dict]:
    """Per-token clipped surrogate loss and the per-token facts its metrics are made of:
    {"ratio": ratio_BT, "clip_high": bool_BT, "clip_low": bool_BT, "dual_clip": bool_BT}."""
    ratio_BT = torch.exp((logp_BT - old_logp_BT).clamp(-log_ratio_clamp, log_ratio_clamp))
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


def truncated_is_weights(old_logp_BT: Tensor, rollout_logp_BT: Tensor, cap: float,
                         log_ratio_clamp: float = 20.0) -> Tensor:
    """min(pi_trainer / pi_rollout, cap) per token, detached (it reweights, never trains)."""
    lr_BT = (old_logp_BT - rollout_logp_BT).detach().clamp(-log_ratio_clamp, log_ratio_clamp)
    return torch.exp(lr_BT).clamp(max=cap)


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
    clip_eps_low: float = 0.2
    """ratio floor is 1 - clip_eps_low (for A < 0)"""
    clip_eps_high: float = 0.2
    """ratio ceiling is 1 + clip_eps_high (for A > 0); > clip_eps_low is clip-higher (DAPO: 0.28)"""
    dual_clip_c: float | None = None
    """dual-clip bound c > 1 on -A * ratio for A < 0 (e.g. 3.0); None disables"""
    kl_coef: float = 0.0
    """weight of the KL-to-reference term; 0 means KL is only logged (if ref_logp is given)"""
    kl_estimator: str = "k3"
    """name in KL_ESTIMATORS: k1, k2, k3"""
    kl_clamp: float = 10.0
    """per-token KL estimates are clamped to [-kl_clamp, kl_clamp]"""
    log_ratio_clamp: float = 20.0
    """every log-ratio is clamped to +-this before exp"""
    aggregation: str = "token-mean"
    """name in AGGREGATIONS"""
    norm_len: int | None = None
    """L for seq-mean-token-sum-norm (use the max response length); None uses T"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus (loss -= entropy_coef * agg(entropy)); needs entropy_BT"""
    tis_cap: float | None = None
    """truncated importance sampling cap for rollout/trainer mismatch (e.g. 2.0); None disables"""

    def __post_init__(self):
        _pick(KL_ESTIMATORS, self.kl_estimator, "LossConfig.kl_estimator")
        _pick(AGGREGATIONS, self.aggregation, "LossConfig.aggregation")
        if self.clip_eps_low < 0 or self.clip_eps_high < 0 or self.clip_eps_low >= 1:
            raise ValueError(f"LossConfig: need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, "
                             f"got {self.clip_eps_low}, {self.clip_eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"LossConfig.dual_clip_c must be > 1 (typically 3), got {self.dual_clip_c}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"LossConfig.tis_cap must be > 0 (typically 2), got {self.tis_cap}")


def _pick(registry: dict, name: str, what: str):
    if name not in registry:
        raise KeyError(f"unknown {what} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


def _check_shapes(mask_BT: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != mask_BT.shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(t.shape)} but mask_BT has "
                             f"{tuple(mask_BT.shape)}; pass per-token tensors of the response tokens only")


def grpo_loss(cfg: LossConfig, *, logp_BT: Tensor, adv_B: Tensor, mask_BT: Tensor,
              old_logp_BT: Tensor | None = None, ref_logp_BT: Tensor | None = None,
              rollout_logp_BT: Tensor | None = None, entropy_BT: Tensor | None = None,
              num_tokens: float | None = None, num_seqs: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of one (micro-)batch and its metrics (detached 0-d tensors, token means
    over this batch's unmasked tokens).

    logp_BT: log-probs of the sampled tokens under the policy being trained (with grad).
    adv_B: per-response advantages (or adv_BT, per token).
    old_logp_BT: the trainer's log-probs before this update; None means on-policy (logp.detach()).
    ref_logp_BT: reference-model log-probs; needed when kl_coef > 0, logged whenever given.
    rollout_logp_BT: the rollout engine's log-probs; gives mismatch metrics, and TIS if tis_cap.
    entropy_BT: per-token entropy (entropy_from_logits); logged, and used if entropy_coef > 0.
    num_tokens / num_seqs: global-batch counts for the aggregation (see `aggregate`).
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

    pg_BT, facts = ppo_clip_loss(logp_BT, old_logp_BT, adv_BT, cfg.clip_eps_low, cfg.clip_eps_high,
                                 cfg.dual_clip_c, cfg.log_ratio_clamp)
    metrics = _clip_metrics(facts, logp_BT, old_logp_BT, mask_BT)
    if rollout_logp_BT is not None:
        metrics.update(mismatch_metrics(old_logp_BT, rollout_logp_BT, mask_BT))
        if cfg.tis_cap is not None:
            w_BT = truncated_is_weights(old_logp_BT, rollout_logp_BT, cfg.tis_cap, cfg.log_ratio_clamp)
            pg_BT = pg_BT * w_BT
            metrics["tis/weight_mean"] = masked_mean(w_BT, mask_BT)
            metrics["tis/truncated_frac"] = masked_mean((w_BT >= cfg.tis_cap).float(), mask_BT)
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
