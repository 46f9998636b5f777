-- Rewards outside the configured [incorrect, correct] range, or not finite.
with final as (
    select experiment, round, prompt_id, sample_idx, reward, outcome
    from rewards
    where experiment = $experiment and round = $round
      and (not isfinite(reward) or reward < $reward_min or reward > $reward_max)
)

select * from final
