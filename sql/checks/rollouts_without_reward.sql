-- Rollouts of the round that have no reward row.
with final as (
    select r.experiment, r.round, r.prompt_id, r.sample_idx
    from rollouts as r
    anti join rewards as w using (experiment, round, prompt_id, sample_idx)
    where r.experiment = $experiment and r.round = $round
)

select * from final
