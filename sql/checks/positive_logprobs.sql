-- Rollouts whose behaviour log-probs are above 0 (a probability above 1) or not finite.
with final as (
    select experiment, round, prompt_id, sample_idx, behaviour_logprob, behaviour_logprobs
    from rollouts
    where experiment = $experiment and round = $round
      and (
          behaviour_logprob > 1e-6
          or not isfinite(behaviour_logprob)
          or list_max(behaviour_logprobs) > 1e-6
          or not isfinite(list_sum(behaviour_logprobs))
      )
)

select * from final
