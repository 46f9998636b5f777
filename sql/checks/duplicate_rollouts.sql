-- stage: rollouts
-- Rows of rollouts that share (experiment, round, prompt_id, sample_idx).
with final as (
    select 'rollouts' as tbl, experiment, round, prompt_id, sample_idx, count(*) as copies
    from rollouts
    where experiment = $experiment and round = $round
    group by all
    having count(*) > 1
)

select * from final
