-- stage: advantages
-- Rows of advantages that share (experiment, round, prompt_id, sample_idx).
with final as (
    select 'advantages' as tbl, experiment, round, prompt_id, sample_idx, count(*) as copies
    from advantages
    where experiment = $experiment and round = $round
    group by all
    having count(*) > 1
)

select * from final
