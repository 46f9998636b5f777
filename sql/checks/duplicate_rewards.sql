-- stage: rewards
-- Rows of rewards that share (experiment, round, prompt_id, sample_idx).
with final as (
    select 'rewards' as tbl, experiment, round, prompt_id, sample_idx, count(*) as copies
    from rewards
    where experiment = $experiment and round = $round
    group by all
    having count(*) > 1
)

select * from final
