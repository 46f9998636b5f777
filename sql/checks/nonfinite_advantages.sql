-- Advantages or baselines that are NaN or infinite.
with final as (
    select experiment, round, prompt_id, sample_idx, baseline, advantage
    from advantages
    where experiment = $experiment and round = $round
      and (not isfinite(advantage) or not isfinite(baseline))
)

select * from final
