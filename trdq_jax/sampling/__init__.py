"""Noise schedules and jitted ``lax.scan`` samplers with batched classifier-free guidance.

    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=50, num_segments=4))
    x = sample(denoise_fn_for(model), params, sampler, labels, seed=0, cfg_scale=4.0,
               null_label=num_classes, shape=(len(labels), 32, 32, 4))
"""
from trdq_jax.sampling.cfg_plan import CFGPlan, preset_plan, rules_plan
from trdq_jax.sampling.scan_sampler import denoise_fn_for, initial_noise, sample
from trdq_jax.sampling.schedules import (SCHEDULES, alphas_cumprod, make_betas, respaced_betas,
                                         space_timesteps)
from trdq_jax.sampling.solvers import SOLVERS, Sampler, make_sampler, uniform_segment_table

__all__ = ["CFGPlan", "SCHEDULES", "SOLVERS", "Sampler", "alphas_cumprod", "denoise_fn_for",
           "initial_noise", "make_betas", "make_sampler", "preset_plan", "respaced_betas",
           "rules_plan", "sample", "space_timesteps", "uniform_segment_table"]
